"""Attention implementations against the dense, position-masked rule: the blockwise kernel alone,
then every implementation `config.attention` can pick (blockwise, splash interpreted, and
jax.nn.dot_product_attention, whose XLA version stands in for cuDNN here) inside the whole model,
values and gradients; the platform choice itself; bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from gpt2_jax.model import GPT2
from gpt2_jax.model.attention import attend, causal_self_attention, resolve_attention
from gpt2_jax.model.blockwise import causal_attention
from gpt2_jax.model.config import ModelConfig


def _inputs(B, T, K, G, H, seed=0, dtype=np.float32):
    """q, k, v and a random cotangent w, drawn by numpy (no random or cast programs to compile)."""
    rng = np.random.default_rng(seed)
    shapes = ((B, T, K, G, H), (B, T, K, H), (B, T, K, H), (B, T, K, G, H))
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype)) for shape in shapes)


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

    def loss(fn, q, k, v, w):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

    @jax.jit  # traced once, where eager would dispatch each block's ops one by one; both in one program
    def got_and_want(*xs):
        return (loss(lambda q, k, v: causal_attention(q, k, v, window, block), *xs),
                loss(lambda q, k, v: _dense(q, k, v, window), *xs))

    got, want = got_and_want(q, k, v, w)
    for name, a, b in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


def test_blockwise_output_ignores_future_tokens():
    """Changing tokens after t leaves outputs up to t (and their gradients wrt the past) unchanged."""
    q, k, v, _ = (np.asarray(x) for x in _inputs(1, 30, 2, 1, 4))
    attention = jax.jit(lambda q, k, v: causal_attention(q, k, v, None, 8))
    out = attention(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[:, 20:] = -k[:, 20:]
    v2[:, 20:] += 3.0
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
    params = random_params(base, std=0.02)  # GPT-2's init scale, with no initialiser to compile
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 64, (2, T)), jnp.int32)
    cotangent = jnp.asarray(rng.standard_normal((2, T, 64), np.float32))
    implementations = ("dense", "blockwise", "splash", "cudnn")  # cudnn: the dot_product_attention call, XLA here

    def logits_and_grads(attention, params):
        logits, pullback = jax.vjp(lambda p: GPT2(base.replace(attention=attention)).apply({"params": p}, tokens), params)
        return logits, pullback(cotangent)[0]

    # All four in one program: compiled once, at about half the time of four programs.
    want, *others = jax.jit(lambda p: [logits_and_grads(a, p) for a in implementations])(params)
    for attention, got in zip(implementations[1:], others):
        for path, a, b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), jax.tree.leaves(want)):
            err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
            assert err <= 1e-5, f"{attention}: {jax.tree_util.keystr(path[0])} relative error {err:.2e}"


def _out_and_grads(fn, q, k, v, w):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(w.astype(out.dtype))


BF16_IMPLEMENTATIONS = ("blockwise", "splash", "cudnn")
_BF16: dict = {}


def _bf16_results():
    """attention -> (output, gradients) of bf16 q, k, v through each implementation, and "fp32" ->
    those of the fp32 dense rule on the same (bf16-rounded) inputs; one program, computed once."""
    if not _BF16:
        def run(*xs):
            results = {}
            for attention in BF16_IMPLEMENTATIONS:
                cfg = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=64, block_size=256, sliding_window=100,
                                  dtype="bfloat16", attention=attention)
                results[attention] = _out_and_grads(lambda q, k, v: causal_self_attention(cfg, q, k, v), *xs)
            exact = [x.astype(jnp.float32) for x in xs]
            results["fp32"] = _out_and_grads(lambda q, k, v: _dense(q, k, v, 100), *exact)
            return results

        _BF16.update(jax.jit(run)(*_inputs(2, 200, 2, 2, 16, dtype=jnp.bfloat16)))
    return _BF16


@pytest.mark.parametrize("attention", BF16_IMPLEMENTATIONS)
def test_bfloat16_implementations_close_to_float32_dense(attention):
    """bf16 q, k, v through each implementation vs the fp32 dense rule on the same (bf16-rounded)
    inputs. bf16 keeps 8 significant bits (relative rounding up to 2^-9 = 0.2%); the kernels round
    the probabilities and the output (forward) and dS, P and the results (backward) once each, so
    a few such roundings at the scale of the largest element: 2% of it forward, 3% backward."""
    (low_out, low_grads), (ref_out, ref_grads) = _bf16_results()[attention], _bf16_results()["fp32"]
    assert low_out.dtype == jnp.bfloat16
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))  # noqa: E731
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
