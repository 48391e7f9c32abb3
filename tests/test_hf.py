"""Parity with Hugging Face GPT-2: import, export, and logits equal within 1e-4 (fp32).

The live tests need torch + transformers (CI installs both; where CI=true they are required).
The committed fixture (tests/fixtures/hf_tiny, made by make_golden.py) checks parity without torch.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params, require

from gpt2_jax import GPT2, ModelConfig
from gpt2_jax.model.config import count_params
from gpt2_jax.model.hf import load_hf_gpt2, save_hf_gpt2

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf_tiny")


@pytest.fixture(scope="module")
def torch():
    t = require("torch")
    require("transformers")
    t.manual_seed(0)
    return t


@functools.cache
def _forward(config):  # one jitted forward per config: a config seen again is neither traced nor compiled again
    return jax.jit(lambda p, t: GPT2(config).apply({"params": p}, t))


def ours(config, params, tokens):
    return np.asarray(_forward(config)(params, jnp.asarray(tokens)))


def hf_logits(torch, model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def randomise(torch, model, scale=0.3):
    """Weights far from the 0.02 init, so that a wrong layout or a missed parameter shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * scale + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0))
    return model


def test_golden_fixture_parity_without_torch():
    config, params = load_hf_gpt2(FIXTURE)
    assert (config.n_layer, config.n_head, config.n_embd, config.mlp_dim) == (3, 5, 30, 70)
    assert config.layer_norm_eps == 1e-6 and config.block_size == 24 and config.vocab_size == 211
    expected = np.load(os.path.join(FIXTURE, "expected.npz"))
    got = ours(config, params, expected["tokens"])
    err = np.abs(got - expected["logits"]).max()
    assert err < 1e-4, err
    assert np.abs(expected["logits"]).max() > 1.0  # the fixture is not trivially near zero


@pytest.mark.parametrize(
    "shape",
    [
        dict(n_layer=3, n_head=6, n_embd=48, n_inner=100, n_positions=40, vocab_size=1000, layer_norm_epsilon=1e-6),
        dict(n_layer=1, n_head=1, n_embd=16, n_positions=9, vocab_size=50),
    ],
    ids=["unusual", "single-head"],
)
def test_live_parity_small(torch, tmp_path, shape):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = randomise(torch, GPT2LMHeadModel(GPT2Config(**shape, bos_token_id=0, eos_token_id=0)).eval())
    hf.save_pretrained(tmp_path)
    config, params = load_hf_gpt2(str(tmp_path))
    tokens = np.random.default_rng(0).integers(0, shape["vocab_size"], (3, shape["n_positions"]))
    err = np.abs(ours(config, params, tokens) - hf_logits(torch, hf, tokens)).max()
    print(f"max |logit diff| {shape}: {err:.2e}")
    assert err < 1e-4


def test_live_parity_124m(torch, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config()).eval()  # the full GPT-2 small shape, random init
    hf.save_pretrained(tmp_path)
    config, params = load_hf_gpt2(str(tmp_path))
    assert config == ModelConfig.from_preset("gpt2")
    assert count_params(params) == 124_439_808
    tokens = np.random.default_rng(1).integers(0, 50257, (2, 64))
    err = np.abs(ours(config, params, tokens) - hf_logits(torch, hf, tokens)).max()
    print(f"max |logit diff| gpt2 124M: {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.15)])
def test_save_round_trips_through_transformers(torch, tmp_path, dtype, tol):
    from transformers import GPT2LMHeadModel

    config = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=101, pad_vocab_to_multiple=8)
    params = random_params(config, std=0.08)  # large weights (4x GPT-2's init): layout errors show
    save_hf_gpt2(config, params, str(tmp_path), dtype=dtype)
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = np.random.default_rng(2).integers(0, 101, (2, 16))
    want = ours(config, params, tokens)
    err = np.abs(hf_logits(torch, hf, tokens) - want).max()
    assert err < tol * max(1.0, np.abs(want).max() if dtype != "float32" else 1.0), err
    # ...and our own loader reads it back to the same model.
    config2, params2 = load_hf_gpt2(str(tmp_path))
    assert config2.replace(pad_vocab_to_multiple=8) == config
    if dtype == "float32":
        np.testing.assert_allclose(ours(config2, params2, tokens), want, atol=1e-5)


def test_save_then_load_is_exact_without_torch(tmp_path):
    config = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=40)
    params = random_params(config, seed=3, std=0.02)
    save_hf_gpt2(config, params, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model_type"] == "gpt2"
    config2, params2 = load_hf_gpt2(str(tmp_path))
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(position_embedding="rotary"), "position_embedding='rotary'"),
        (dict(n_kv_head=1), "n_kv_head=1"),
        (dict(sliding_window=4), "sliding_window=4"),
    ],
)
def test_export_refuses_what_hf_gpt2_cannot_represent(tmp_path, change, reason):
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40, **change)
    params = random_params(config, std=0.02)
    with pytest.raises(ValueError, match=reason):
        save_hf_gpt2(config, params, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_gpt2(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(n_layer=1, n_head=1, n_embd=8, vocab_size=10)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_gpt2(str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps(dict(n_layer=1, n_head=1, n_embd=8, vocab_size=10, activation_function="relu"))
    )
    with pytest.raises(ValueError, match="activation_function='relu'"):
        load_hf_gpt2(str(tmp_path))
