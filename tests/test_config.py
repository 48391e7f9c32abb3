"""ModelConfig validation and the config files in configs/."""

import glob
import importlib.util
import os

import pytest

from gpt2_jax import ModelConfig
from gpt2_jax.model.config import PRESETS, model_config_from

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")

BAD = [
    (dict(n_head=12, n_kv_head=5), "n_kv_head", "n_head=12 is not divisible by n_kv_head=5"),
    (dict(n_embd=100, n_head=12), "n_head", "n_embd=100 is not divisible by n_head=12"),
    (dict(n_layer=0), "n_layer", "n_layer=0 must be a positive integer"),
    (dict(n_head=-4), "n_head", "n_head=-4"),
    (dict(block_size=0), "block_size", "block_size=0"),
    (dict(vocab_size=1.5), "vocab_size", "vocab_size=1.5"),
    (dict(n_kv_head=0), "n_kv_head", "n_kv_head=0"),
    (dict(position_embedding="alibi"), "position_embedding", "position_embedding='alibi' must be one of"),
    (dict(position_embedding="rotary", n_embd=36, n_head=12), "head_dim", "head_dim=3 .* must be even"),
    (dict(sliding_window=0), "sliding_window", "sliding_window=0"),
    (dict(sliding_window=True), "sliding_window", "sliding_window=True"),
    (dict(dropout=1.0), "dropout", r"dropout=1.0 must be in \[0, 1\)"),
    (dict(dtype="float8"), "dtype", "dtype='float8' must be one of"),
    (dict(param_dtype="int8"), "param_dtype", "param_dtype='int8'"),
    (dict(rope_theta=0.0), "rope_theta", "rope_theta=0.0 must be positive"),
    (dict(pad_vocab_to_multiple=0), "pad_vocab_to_multiple", "pad_vocab_to_multiple=0"),
    (dict(n_inner=-1), "n_inner", "n_inner=-1"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps", "layer_norm_eps=0.0"),
    (dict(remat="yes"), "remat", r"remat='yes' must be one of \('none', 'full', 'save_dots', 'save_qkv'\)"),
    (dict(remat=1), "remat", "remat=1 must be one of"),
]


@pytest.mark.parametrize("overrides,key,message", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_model_config_names_the_key_and_the_rule(overrides, key, message):
    with pytest.raises(ValueError, match=message) as err:
        ModelConfig(**overrides)
    assert key in str(err.value)


def test_validate_rejects_a_config_changed_after_construction():
    cfg = ModelConfig()
    with pytest.raises(ValueError, match="n_head=12 is not divisible by n_kv_head=5"):
        cfg.replace(n_kv_head=5)
    object.__setattr__(cfg, "n_kv_head", 7)  # bypassing the frozen dataclass is still caught
    with pytest.raises(ValueError, match="n_kv_head=7"):
        cfg.validate()


def test_presets_and_round_trip():
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_preset("gpt2-xl").head_dim == 64
    with pytest.raises(ValueError, match="preset='gpt3' is not a known preset"):
        ModelConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['n_layers'\]"):
        ModelConfig.from_dict({"n_layers": 3})
    cfg = ModelConfig(n_kv_head=4, position_embedding="rotary", sliding_window=256)
    assert (cfg.kv_heads, cfg.head_dim, cfg.mlp_dim) == (4, 64, 3072)


def load_config_file(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")) if not os.path.basename(p).startswith("_"))


def test_there_are_config_files():
    assert any(p.endswith("base.py") for p in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[os.path.basename(p) for p in CONFIG_FILES])
def test_every_config_file_loads_and_validates(path):
    config = load_config_file(path)
    model = model_config_from(config.model)
    assert model.validate() is model
    assert config.train.global_batch_size % config.train.grad_accum_steps == 0
    with pytest.raises(AttributeError):  # unknown keys are refused, not silently added
        config.train.not_a_key = 1


def test_model_config_from_rejects_unknown_keys():
    config = load_config_file(os.path.join(CONFIG_DIR, "base.py"))
    with config.unlocked():
        config.model.n_layers = 4
    with pytest.raises(ValueError, match=r"config.model has unknown keys \['n_layers'\]"):
        model_config_from(config.model)


def test_train_flops_per_token_counts_matmul_weights_and_the_causal_attention_half():
    # GPT-2 small at T=1024: 6 x (12 layers x 12 E^2 + V E) + 12 L E (T + 1) / 2, by hand.
    gpt2 = ModelConfig.from_preset("gpt2", pad_vocab_to_multiple=64)  # padded rows are not model work
    assert gpt2.train_flops_per_token(1024) == 6 * (12 * 12 * 768**2 + 50257 * 768) + 12 * 12 * 768 * 512.5
    # Grouped queries shrink k and v; a window caps the keys each query attends to.
    small = ModelConfig(n_layer=2, n_head=4, n_kv_head=1, n_embd=32, vocab_size=100, block_size=64)
    per_layer = 32 * 8 * (4 + 2) + 4 * 8 * 32 + 2 * 32 * 128
    assert small.train_flops_per_token(8) == 6 * (2 * per_layer + 100 * 32) + 12 * 2 * 32 * 4.5
    windowed = small.replace(sliding_window=3)  # queries 0..2 see 1..3 keys (self included), the other 5 see 3
    assert windowed.train_flops_per_token(8) == 6 * (2 * per_layer + 100 * 32) + 12 * 2 * 32 * (6 + 5 * 3) / 8
    assert small.replace(sliding_window=8).train_flops_per_token(8) == small.train_flops_per_token(8)
