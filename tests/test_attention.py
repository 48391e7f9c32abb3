"""Attention implementations against the dense, position-masked rule: the blockwise kernel alone,
then every implementation `config.attention` can pick (blockwise, splash interpreted, and
jax.nn.dot_product_attention, whose XLA version stands in for cuDNN here) inside the whole model,
values and gradients; the platform choice itself; bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.model import GPT2, init_params
from gpt2_jax.model.attention import attend, causal_self_attention, resolve_attention
from gpt2_jax.model.blockwise import causal_attention
from gpt2_jax.model.config import ModelConfig


def _inputs(B, T, K, G, H, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, T, K, G, H))
    k = jax.random.normal(ks[1], (B, T, K, H))
    v = jax.random.normal(ks[2], (B, T, K, H))
    w = jax.random.normal(ks[3], (B, T, K, G, H))  # a random cotangent
    return q, k, v, w


def _dense(q, k, v, window):
    B, T, K, G, H = q.shape
    cfg = ModelConfig(n_layer=1, n_head=K * G, n_kv_head=K, n_embd=K * G * H, sliding_window=window,
                      block_size=max(T, 8))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    return attend(cfg, q, pos, [(k, v, pos)])


@pytest.mark.parametrize(
    "B,T,K,G,H,window,block",
    [
        (2, 37, 3, 1, 8, None, 8),  # T not a multiple of the block
        (1, 32, 2, 3, 4, None, 8),  # grouped queries
        (2, 40, 1, 4, 8, None, 16),  # multi-query
        (2, 45, 2, 2, 4, 11, 8),  # sliding window smaller than a block pair, ragged end
        (1, 24, 2, 1, 4, 8, 8),  # window equal to the block
        (1, 16, 2, 1, 4, None, 64),  # one block longer than the sequence
    ],
)
def test_blockwise_equals_dense_forward_and_gradients(B, T, K, G, H, window, block):
    q, k, v, w = _inputs(B, T, K, G, H)

    def loss(fn):  # jitted: traced once, where eager would dispatch each block's ops one by one
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)

    got = loss(lambda q, k, v: causal_attention(q, k, v, window, block))
    want = loss(lambda q, k, v: _dense(q, k, v, window))
    for name, a, b in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


def test_blockwise_output_ignores_future_tokens():
    """Changing tokens after t leaves outputs up to t (and their gradients wrt the past) unchanged."""
    q, k, v, _ = _inputs(1, 30, 2, 1, 4)
    attention = jax.jit(lambda q, k, v: causal_attention(q, k, v, None, 8))
    out = attention(q, k, v)
    k2 = k.at[:, 20:].set(-k[:, 20:])
    v2 = v.at[:, 20:].add(3.0)
    out2 = attention(q, k2, v2)
    np.testing.assert_array_equal(np.asarray(out[:, :20]), np.asarray(out2[:, :20]))
    assert not np.allclose(np.asarray(out[:, 20:]), np.asarray(out2[:, 20:]))


# Whole-model cases, each a mix of what the implementations must get right. T <= 256 keeps
# splash (interpreted, 128-token blocks) at one or two blocks; 200 and 160 are not multiples of
# its block, so its padding is exercised.
MODEL_CASES = {
    "mha-learned-T200": (dict(), 200),
    "gqa-rotary-window50-T160": (dict(n_kv_head=2, sliding_window=50, position_embedding="rotary"), 160),
    "mqa-learned-window128-T256": (dict(n_kv_head=1, sliding_window=128), 256),
}


@pytest.mark.parametrize("extra,T", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_every_implementation_equals_dense_in_the_model(extra, T):
    """Logits and parameter gradients of the whole model, each implementation against 'dense'."""
    base = ModelConfig(n_layer=1, n_head=4, n_embd=32, block_size=256, vocab_size=64, **extra)
    params = init_params(base, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, 64)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, T, 64))

    @functools.partial(jax.jit, static_argnums=0)
    def logits_and_grads(attention, params):
        logits, pullback = jax.vjp(lambda p: GPT2(base.replace(attention=attention)).apply({"params": p}, tokens), params)
        return logits, pullback(cotangent)[0]

    want = logits_and_grads("dense", params)
    for attention in ("blockwise", "splash", "cudnn"):  # cudnn: the dot_product_attention call, XLA here
        got = logits_and_grads(attention, params)
        for path, a, b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), jax.tree.leaves(want)):
            err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
            assert err <= 1e-5, f"{attention}: {jax.tree_util.keystr(path[0])} relative error {err:.2e}"


def _out_and_grads(fn, q, k, v, w):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(w.astype(out.dtype))


_REFERENCE = {}


def _bf16_reference():
    """The fp32 dense output and gradients for the bf16 test's inputs, computed once."""
    if not _REFERENCE:
        q, k, v, w = (x.astype(jnp.bfloat16).astype(jnp.float32) for x in _inputs(2, 200, 2, 2, 16))
        _REFERENCE["fp32"] = jax.jit(lambda *xs: _out_and_grads(lambda q, k, v: _dense(q, k, v, 100), *xs))(q, k, v, w)
    return _REFERENCE["fp32"]


@pytest.mark.parametrize("attention", ["blockwise", "splash", "cudnn"])
def test_bfloat16_implementations_close_to_float32_dense(attention):
    """bf16 q, k, v through each implementation vs the fp32 dense rule on the same (bf16-rounded)
    inputs. bf16 keeps 8 significant bits (relative rounding up to 2^-9 = 0.2%); the kernels round
    the probabilities and the output (forward) and dS, P and the results (backward) once each, so
    a few such roundings at the scale of the largest element: 2% of it forward, 3% backward."""
    cfg = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=64, block_size=256, sliding_window=100,
                      dtype="bfloat16", attention=attention)
    q, k, v, w = (x.astype(jnp.bfloat16) for x in _inputs(2, 200, 2, 2, 16))
    low_out, low_grads = jax.jit(lambda *xs: _out_and_grads(lambda q, k, v: causal_self_attention(cfg, q, k, v), *xs))(
        q, k, v, w)
    assert low_out.dtype == jnp.bfloat16
    ref_out, ref_grads = _bf16_reference()
    rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))  # noqa: E731
    assert rel(low_out, ref_out) <= 2e-2
    for name, a, b in zip(("dq", "dk", "dv"), low_grads, ref_grads):
        assert a.dtype == jnp.bfloat16
        assert rel(a, b) <= 3e-2, name


def test_the_platform_choice():
    def pick(backend, **kw):
        return resolve_attention(ModelConfig(**{"n_layer": 1, "n_head": 4, "n_embd": 64, **kw}), backend)[0]

    assert pick("cpu") == "blockwise"
    assert pick("tpu") == "splash"
    assert pick("tpu", dtype="bfloat16") == "splash"
    assert pick("gpu", dtype="bfloat16") == "cudnn"
    assert pick("gpu", dtype="float16") == "cudnn"
    impl, why = resolve_attention(ModelConfig(n_layer=1, n_head=4, n_embd=64), "gpu")
    assert (impl, why) == ("blockwise", "auto: GPU, but cuDNN attention needs dtype bfloat16 or float16, "
                                        "dtype is float32")
    assert pick("gpu", dtype="bfloat16", n_embd=36) == "blockwise"  # head_dim 9: not a multiple of 8
    assert pick("gpu", dtype="bfloat16", n_head=1, n_embd=512) == "blockwise"  # head_dim 512 > 256
    for explicit in ("blockwise", "dense", "splash", "cudnn"):
        assert pick("cpu", attention=explicit) == explicit
    with pytest.raises(ValueError, match=r"attention='cudnn': cuDNN attention needs dtype bfloat16 or float16"):
        pick("gpu", attention="cudnn")
    with pytest.raises(ValueError, match=r"attention='flash' must be one of \('auto', 'blockwise'"):
        ModelConfig(attention="flash")
