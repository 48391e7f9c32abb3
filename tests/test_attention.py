"""Blockwise causal attention (gpt2_jax/model/attention.py) against the dense, position-masked rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.model.attention import causal_attention
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.layers import attend
from gpt2_jax.model import GPT2, init_params


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


def test_blockwise_bfloat16_close_to_float32():
    q, k, v, _ = _inputs(2, 50, 2, 2, 8)
    attention = jax.jit(lambda q, k, v: causal_attention(q, k, v, None, 16))
    ref = attention(q, k, v)
    low = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(ref), atol=5e-2)


@pytest.mark.parametrize("extra", [{}, {"n_kv_head": 2, "sliding_window": 70}, {"position_embedding": "rotary"}])
def test_model_default_positions_equal_explicit_positions(extra):
    """GPT2 without positions (blockwise path, several query blocks) == with explicit 0..T-1 (dense path)."""
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=300, vocab_size=97, **extra)
    params = init_params(cfg, jax.random.PRNGKey(1))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 300), 0, 97)
    positions = jnp.broadcast_to(jnp.arange(300), (2, 300))
    apply = jax.jit(GPT2(cfg).apply)
    got = apply({"params": params}, tokens)
    want = apply({"params": params}, tokens, positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
