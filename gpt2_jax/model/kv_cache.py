"""The KV cache of one attention layer: a ring buffer of keys, values and their positions.

`Attention(decode=True)` keeps it in the "cache" collection: k [B, K, L, H], v [B, K, H, L] and
the position stored in each slot [B, L] (-1 = empty). These are the layouts a decode step's two
attention matmuls (q . k^T over H, p . v over L, batched over B x K) read as they lie; with k and
v as [B, L, K, H], XLA:CPU transposed every layer's cache at every step. L is the length of the
input seen when the cache is created (`GPT2.init_cache`), capped at the sliding window.

A token at position p goes to slot p mod L of its own row, so rows may advance by different
amounts per call (speculative decoding) and slots are reused as a ring buffer: with a window only
the last `window` tokens are ever needed. Without a window the caller keeps positions below L.
Setting a slot's position to -1 hides it (how speculative decoding rolls back rejected tokens);
the next token at that position overwrites it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_jax.model.attention import attend
from gpt2_jax.model.config import ModelConfig


def attend_with_cache(module: nn.Module, cfg: ModelConfig, q, k, v, positions, drop) -> jax.Array:
    """Attention of the new tokens over the cache of `module` (an Attention layer) and themselves;
    the new keys and values are written into the ring. q [B, T, K, G, H], k, v [B, T, K, H],
    positions [B, T] (-1 = padding). The first call (GPT2.init_cache) only creates the cache."""
    B, T, K, H = k.shape
    initializing = not module.has_variable("cache", "k")
    L = T if cfg.sliding_window is None else min(T, cfg.sliding_window)
    cache_k = module.variable("cache", "k", jnp.zeros, (B, K, L, H), k.dtype)
    cache_v = module.variable("cache", "v", jnp.zeros, (B, K, H, L), v.dtype)
    cache_pos = module.variable("cache", "pos", lambda: jnp.full((B, L), -1, jnp.int32))
    if initializing:
        return attend(cfg, q, positions, [(k, v, positions)], drop)

    def cached():  # as attend takes keys: [B, L, K, H]
        return cache_k.value.swapaxes(1, 2), cache_v.value.transpose(0, 3, 1, 2), cache_pos.value

    # Write first, then attend over the cache alone, when no new token evicts a key that a new
    # query still sees: one token per row (its slot held position p - L, outside any window
    # L >= window), or no ring (no window). XLA then updates the cache in place; attending over
    # [old cache, new keys] instead keeps the old cache alive past the write, which costs a copy
    # of every layer's cache per step.
    write_first = T == 1 or cfg.sliding_window is None
    out = None if write_first else attend(cfg, q, positions, [cached(), (k, v, positions)], drop)
    _write(cache_k, cache_v, cache_pos, k, v, positions)
    return attend(cfg, q, positions, [cached()], drop) if write_first else out


def _write(cache_k, cache_v, cache_pos, k, v, positions) -> None:
    """Writes the newest min(T, L) columns into the ring; older ones can never be attended to
    again (with a window) or do not fit (the caller's error). Padding (-1) gets slot L, out of
    range, which the scatter drops."""
    B, T, K, _ = k.shape
    L = cache_pos.value.shape[1]
    n = min(T, L)
    new_pos = positions[:, T - n :].astype(jnp.int32)  # [B, n]
    slots = jnp.where(new_pos >= 0, new_pos % L, L)  # [B, n]
    rows = jnp.arange(B)[:, None]  # [B, 1]
    # One index triple per (row, head, token), even at B = 1: a single-slot write would become a
    # dynamic-update-slice, which XLA:CPU then fuses into each of the cache's readers (copying the
    # cache for every copy of the write).
    heads = jnp.arange(K)[None, :, None]  # [1, K, 1]
    index = (rows[:, :, None], heads, slots[:, None, :])  # [B, K, n] each, broadcast
    update_k = k[:, T - n :].swapaxes(1, 2).astype(cache_k.value.dtype)  # [B, K, n, H]
    update_v = v[:, T - n :].swapaxes(1, 2).astype(cache_v.value.dtype)
    cache_k.value = cache_k.value.at[index].set(update_k, mode="drop")
    # v's slot axis is last: the index pairs sit around the H slice, so the update is again [B, K, n] + [H].
    cache_v.value = cache_v.value.at[index[0], index[1], :, index[2]].set(update_v, mode="drop")
    cache_pos.value = cache_pos.value.at[rows, slots].set(new_pos, mode="drop")
