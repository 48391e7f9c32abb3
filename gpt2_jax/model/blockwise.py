"""Causal self-attention over a whole sequence, by query blocks that skip the masked half.

The CPU's implementation of `config.attention` (gpt2_jax/model/attention.py picks it), used for
training and evaluation, where token t sits at position t (no padding, no cache); the KV cache
and padded prompts go through `attention.attend`, which masks by explicit positions.

The sequence is cut into query blocks of `block` tokens. Query block i attends to keys
[lo_i, hi_i): hi_i is the end of block i (causality) and lo_i is the first block that the
sliding window can reach (0 without a window), so the score blocks wholly above the diagonal or
behind the window are never computed: about half the T x T work at T >> block. Only the
columns inside the diagonal block and the window's edge are masked.

Packed documents (`segment_ids` [B, T]) add a mask per block: a key of another segment is hidden.
No block is skipped for them: the key range of a block is static, and a block could be dropped only
where no row of the whole batch (each packed differently) sees it, which at GPT-2's document lengths
is rare; so the saving is left to splash, whose blocks are per sequence.

Each query block sees all of its keys at once, so its softmax is exact, not the running
"online" softmax of FlashAttention. The backward pass is written out (`jax.custom_vjp`) the
way FlashAttention's is: it keeps only q, k, v, the output and the log-sum-exp of each score
row, and recomputes the probabilities block by block, so no [T, T] tensor outlives its block.

Einsum letters: B batch, K kv heads, M rows of a query block (its tokens x the G query heads
that share a kv head), S keys of the block's range, H head_dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_MASKED = float(np.finfo(np.float32).min)  # score of a masked key: exp(_MASKED - m) == 0


def _blocks(T: int, block: int, window: int | None) -> list[tuple[int, int, int, int]]:
    """Static (q_start, q_end, k_start, k_end) of every query block."""
    out = []
    for q_start in range(0, T, block):
        q_end = min(q_start + block, T)
        k_start = 0
        if window is not None:  # the oldest key any row of this block may see, rounded down to a block
            k_start = max(0, q_start - window + 1) // block * block
        out.append((q_start, q_end, k_start, q_end))
    return out


def _mask(q_start: int, q_end: int, k_start: int, k_end: int, groups: int, window: int | None):
    """[M, S] bool (True = visible) for one block, or None when every key is visible."""
    t = np.repeat(np.arange(q_start, q_end), groups)[:, None]  # row m is token q_start + m // groups
    s = np.arange(k_start, k_end)[None, :]
    visible = s <= t
    if window is not None:
        visible &= (t - s) < window
    return None if visible.all() else jnp.asarray(visible)


def _segment_mask(segment_ids, q_start: int, q_end: int, k_start: int, k_end: int, groups: int):
    """[B, 1, M, S] bool (True = same segment) for one block, or None without segment ids."""
    if segment_ids is None:
        return None
    q_seg = jnp.repeat(segment_ids[:, q_start:q_end], groups, axis=1)  # [B, M], row m is token q_start + m // G
    return (q_seg[:, :, None] == segment_ids[:, None, k_start:k_end])[:, None]


def _both(mask, segment_mask):
    if segment_mask is None:
        return mask
    return segment_mask if mask is None else mask & segment_mask


def _scores(q_blk, k_blk, mask, scale):
    s = jnp.einsum("bkmh,bksh->bkms", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    return s if mask is None else jnp.where(mask, s, _MASKED)


def _layout(q, k, v):
    """[B, T, K, G, H], [B, T, K, H] x2 -> [B, K, T*G, H], [B, K, T, H] x2 (rows t-major, then g)."""
    B, T, K, G, H = q.shape
    qt = q.transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    return qt, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _forward(q, k, v, segment_ids, window, block):
    B, T, K, G, H = q.shape
    scale = H**-0.5
    qt, kt, vt = _layout(q, k, v)
    outs, lses = [], []
    for q_start, q_end, k_start, k_end in _blocks(T, block, window):
        q_blk = qt[:, :, q_start * G : q_end * G]
        mask = _both(_mask(q_start, q_end, k_start, k_end, G, window),
                     _segment_mask(segment_ids, q_start, q_end, k_start, k_end, G))
        s = _scores(q_blk, kt[:, :, k_start:k_end], mask, scale)  # [B, K, M, S] fp32
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkms,bksh->bkmh", p.astype(v.dtype), vt[:, :, k_start:k_end],
                       preferred_element_type=jnp.float32) / denom
        outs.append(o)
        lses.append((m + jnp.log(denom))[..., 0])  # [B, K, M]
    o = jnp.concatenate(outs, axis=2)  # [B, K, T*G, H] fp32
    lse = jnp.concatenate(lses, axis=2)  # [B, K, T*G]
    out = o.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).astype(q.dtype)
    return out, (qt, kt, vt, o, lse, segment_ids)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None, block: int,
                     segment_ids: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(H) + causal mask) v for q [B, T, K, G, H], k, v [B, T, K, H].

    Token t attends to tokens max(0, t - window + 1) .. t, and with `segment_ids` [B, T] int only
    to those of its own segment. Returns [B, T, K, G, H] in q's dtype; scores, softmax and
    accumulation are fp32.
    """
    return _attention(q, k, v, segment_ids, window, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, segment_ids, window, block):
    return _forward(q, k, v, segment_ids, window, block)[0]


def _bwd(window, block, residuals, d_out):
    qt, kt, vt, o, lse, segment_ids = residuals
    B, K, TG, H = qt.shape
    T = kt.shape[2]
    G = TG // T
    scale = H**-0.5
    do = d_out.transpose(0, 2, 1, 3, 4).reshape(B, K, TG, H).astype(jnp.float32)
    delta = jnp.sum(do * o, axis=-1)  # [B, K, T*G]: rowsum(dP * P) = rowsum(dO * O)
    dq_blocks = []
    dk = jnp.zeros(kt.shape, jnp.float32)
    dv = jnp.zeros(vt.shape, jnp.float32)
    for q_start, q_end, k_start, k_end in _blocks(T, block, window):
        rows = slice(q_start * G, q_end * G)
        q_blk, do_blk = qt[:, :, rows], do[:, :, rows]
        k_blk, v_blk = kt[:, :, k_start:k_end], vt[:, :, k_start:k_end]
        mask = _both(_mask(q_start, q_end, k_start, k_end, G, window),
                     _segment_mask(segment_ids, q_start, q_end, k_start, k_end, G))
        s = _scores(q_blk, k_blk, mask, scale)
        p = jnp.exp(s - lse[:, :, rows, None])  # the forward's probabilities, recomputed
        # In the compute dtype like every other matmul here (bf16 in mixed precision), fp32 out.
        dp = jnp.einsum("bkmh,bksh->bkms", do_blk.astype(vt.dtype), v_blk, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, :, rows, None]) * scale).astype(qt.dtype)
        p = p.astype(qt.dtype)
        dq_blocks.append(jnp.einsum("bkms,bksh->bkmh", ds, k_blk, preferred_element_type=jnp.float32))
        dk = dk.at[:, :, k_start:k_end].add(
            jnp.einsum("bkms,bkmh->bksh", ds, q_blk, preferred_element_type=jnp.float32))
        dv = dv.at[:, :, k_start:k_end].add(
            jnp.einsum("bkms,bkmh->bksh", p, do_blk.astype(qt.dtype), preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dq_blocks, axis=2).reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)
    return (dq.astype(qt.dtype), dk.transpose(0, 2, 1, 3).astype(kt.dtype), dv.transpose(0, 2, 1, 3).astype(vt.dtype),
            None)  # segment ids: integers, no cotangent


_attention.defvjp(_forward, _bwd)  # _forward returns (out, residuals)
