"""The chunked loss (gpt2_jax/model/loss.py) equals the whole-logits loss and its gradients: fp32 and
bf16, tied and untied heads, soft-capped logits, dropout, a padded vocabulary, chunks that do not divide T,
on fsdp and tensor meshes; its compiled program holds no [B, T, V] array; evaluation uses it."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from gpt2_jax.model import scoring
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import GPT2Hidden, abstract_params
from gpt2_jax.model.loss import ACCELERATOR_CHUNK, CPU_CHUNK, resolve_loss_chunk
from gpt2_jax.training import sharding
from gpt2_jax.training import step as step_lib

B, T = 4, 16
# vocab 97 padded to 104: the 7 padded columns must stay out of every softmax.
# One layer: the loss reads only the last residual stream, and each layer costs compile time.
BASE = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, block_size=T, vocab_size=97,
                   pad_vocab_to_multiple=8, loss_chunk=0)
# Untied, soft-capped and with dropout (the same masks either way), a chunk (4) that divides T. The tied
# head, with a chunk (5) that leaves the last chunk short, is the mesh test's.
UNTIED = BASE.replace(tie_embeddings=False, logit_softcap=3.0, dropout=0.1, loss_chunk=4)


def batch(seed=0):
    tokens = np.random.default_rng(seed).integers(0, BASE.vocab_size, (B, T + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}  # numpy: placed by each program's caller


def whole(cfg):
    return cfg.replace(loss_chunk=0)


def _loss_and_grads(cfg, params, batch):
    rng = jax.random.PRNGKey(7) if cfg.dropout > 0 else None
    return jax.value_and_grad(functools.partial(step_lib.loss_fn, model_config=cfg, dropout_rng=rng))(params, batch)


loss_and_grads = jax.jit(_loss_and_grads, static_argnums=0)
# Both in one program, where no test needs either alone: the model below the head is the same
# computation in both, so the pair compiles in about 2/3 of the time of two programs.
chunked_and_whole = jax.jit(lambda cfg, *a: (_loss_and_grads(cfg, *a), _loss_and_grads(whole(cfg), *a)),
                            static_argnums=0)


def assert_close(got, want, rtol):
    """Loss within rtol; each gradient leaf within rtol of that leaf's largest element."""
    (loss, grads), (want_loss, want_grads) = got, want
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert g.dtype == w.dtype
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.abs(g - w).max() <= rtol * np.abs(w).max(), np.abs(g - w).max() / np.abs(w).max()


def test_the_hidden_module_has_gpt2s_parameters():
    for cfg in (BASE, BASE.replace(tie_embeddings=False)):
        tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        hidden = jax.eval_shape(lambda t, cfg=cfg: GPT2Hidden(cfg).init(jax.random.PRNGKey(0), t), tokens)["params"]
        assert jax.tree.structure(hidden) == jax.tree.structure(abstract_params(cfg))


def test_chunked_loss_and_gradients_equal_the_whole_logits_fp32():
    params = random_params(UNTIED, seed=1, std=0.3)  # std 0.3: logits spread over several nats
    assert_close(loss_and_grads(UNTIED, params, batch()), loss_and_grads(whole(UNTIED), params, batch()), rtol=1e-6)


def test_chunked_loss_and_gradients_in_bfloat16():
    """bf16 compute, fp32 params. Each token's logits, softmax and dh are the same either way; what
    differs is the head's weight gradient: the whole-logits head_matmul rounds it to bf16 once (its
    operands' dtype), the chunked loss sums the chunks' shares in fp32 and does not (loss.py). So
    lm_head's gradient differs by that one rounding, at most 2^-8 of each element, and every other
    leaf, and the loss, only by fp32 summation order."""
    cfg = UNTIED.replace(loss_chunk=5, dtype="bfloat16")
    params = random_params(cfg, seed=2, std=0.3)
    got, want = chunked_and_whole(cfg, params, batch(1))
    head, want_head = got[1].pop("lm_head")["embedding"], want[1].pop("lm_head")["embedding"]
    assert_close(got, want, rtol=1e-6)
    np.testing.assert_allclose(want_head, head, rtol=2**-8, atol=1e-6 * np.abs(head).max())
    assert not np.array_equal(want_head, head)  # the rounding is really there, and bf16 really ran


def _largest_vocab_array(cfg):
    """Elements of the largest array with a vocabulary axis (97 or 104) in the compiled gradient program."""
    params = abstract_params(cfg)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.value.shape, p.value.dtype), params,
                          is_leaf=lambda p: hasattr(p, "value"))
    hlo = loss_and_grads.lower(cfg, params, batch()).compile().as_text()
    sizes = [np.prod([int(d) for d in dims.split(",")])
             for dims in re.findall(r"[a-z]+\d*\[([\d,]+)\]", hlo)
             if {"97", "104"} & set(dims.split(","))]
    return max(sizes)


def test_the_chunked_program_never_holds_whole_logits():
    # The fp32 test's two programs (served from the compilation cache).
    assert _largest_vocab_array(whole(UNTIED)) >= B * T * 97  # the check sees the whole logits where they are
    assert _largest_vocab_array(UNTIED) < B * T * 97


def test_chunked_loss_on_an_fsdp_and_tensor_mesh_equals_the_whole_logits_there():
    """The tied head, fp32, a chunk (5) that leaves the last one short. Batch over fsdp, vocabulary (and
    heads) over tensor, parameters over fsdp. Against the whole logits on the same mesh:
    tests/test_sharding.py holds those to one device's (to its own reduction order), this the chunking."""
    cfg = BASE.replace(loss_chunk=5)
    params = jax.tree.map(np.asarray, random_params(cfg, seed=3, std=0.3))  # host arrays: sliced, not resharded
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    param_shardings = sharding.logical_to_sharding(abstract_params(cfg), mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    def loss_and_grads_of(cfg):
        return jax.value_and_grad(functools.partial(step_lib.loss_fn, model_config=cfg))

    out = (sharding.replicated(mesh), param_shardings)  # chunked and whole in one program, as above
    fn = jax.jit(lambda p, b: (loss_and_grads_of(cfg)(p, b), loss_and_grads_of(whole(cfg))(p, b)),
                 in_shardings=(param_shardings, batch_sharding), out_shardings=(out, out))
    with sharding.sharding_context(mesh):
        got, want = fn(jax.device_put(params, param_shardings), jax.device_put(batch(2), batch_sharding))
    assert got[1]["wte"]["embedding"].sharding == param_shardings["wte"]["embedding"]
    assert_close(jax.device_get(got), jax.device_get(want), rtol=1e-6)


def test_evaluation_scores_with_the_chunked_loss():
    cfg = BASE.replace(loss_chunk=3)
    params = random_params(cfg, seed=4, std=0.3)
    rows = batch(3)
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    positions[1, :4] = -1  # a left-padded row, as multiple-choice scoring packs them
    weights = (positions >= 0).astype(np.float32)
    args = (rows["inputs"], jnp.asarray(positions), rows["targets"], jnp.asarray(weights))
    got, want = jax.jit(  # chunked and whole in one program, as above
        lambda *a: (scoring.row_losses(cfg, *a), scoring.row_losses(whole(cfg), *a)))(params, *args)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_auto_resolves_per_platform_and_bad_values_name_the_key():
    auto = BASE.replace(loss_chunk="auto")
    assert resolve_loss_chunk(auto, "cpu") == CPU_CHUNK
    assert resolve_loss_chunk(auto, "tpu") == resolve_loss_chunk(auto, "gpu") == ACCELERATOR_CHUNK > 0
    assert resolve_loss_chunk(auto) == CPU_CHUNK  # these tests run on CPU devices
    assert resolve_loss_chunk(BASE.replace(loss_chunk=7), "tpu") == 7
    for bad in (-1, 2.5, True, "big"):
        with pytest.raises(ValueError, match=rf"loss_chunk={bad!r} must be 'auto', 0 \(whole logits\) or a positive"):
            BASE.replace(loss_chunk=bad)
