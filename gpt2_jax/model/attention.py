"""Which attention runs, and the dense rule every implementation must equal.

`config.attention` picks how causal self-attention over a whole sequence is computed:

  blockwise  query blocks that skip the masked half, exact softmax, a written-out backward
             (gpt2_jax/model/blockwise.py). Shaped for XLA:CPU; runs anywhere, any dtype.
  dense      the [T, T] score matrix, masked (`attend`): the reference rule. Memory grows as T^2.
  splash     Pallas splash attention, TPU's fused kernel, under shard_map in a mesh
             (gpt2_jax/model/splash.py). Off TPU it runs interpreted (slow: for tests).
  cudnn      jax.nn.dot_product_attention's cuDNN flash kernel on NVIDIA GPUs (bf16/fp16 compute,
             head_dim a multiple of 8 and at most 256). Off GPU the same call runs XLA's version.
  auto       (default) splash on TPU; cudnn on GPU when its rules hold, else blockwise (a log
             line says why); blockwise on CPU.

`resolve_attention` makes that choice - the one place the platform is looked at, read from the
devices of the mesh in effect (gpt2_jax/model/platform.py), not the process's backend - and
`causal_self_attention` runs it. The choice applies where token t sits at index t of its row with
no padding and no cache: training and whole-row evaluation. Explicit positions (padded prompts), the
KV cache of decoding and dropout on the attention probabilities keep the dense rule (`attend`),
which masks by position: every implementation equals it there, and decoding reads one query row.

Packed documents (`segment_ids` [B, T] int32): token i sees key j only if j <= i, both carry the same
segment id and, with a window, i - j < window; the mask is by index, so positions may restart at
each document. Every implementation takes them (splash as its SegmentIds), except cuDNN: the
installed jax.nn.dot_product_attention knows per-row lengths (one segment per row) and a dense mask,
which cuDNN would read as a [B, 1, T, T] bias and differentiate every step; so 'cudnn' (and 'auto' on
a GPU) runs such rows blockwise, saying so in one log line.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

from gpt2_jax.model import platform
from gpt2_jax.model.blockwise import causal_attention
from gpt2_jax.model.config import ModelConfig

IMPLEMENTATIONS = ("auto", "blockwise", "dense", "splash", "cudnn")
# Query block of the blockwise attention: measured fastest of 64 / 128 / 256 / 512 for GPT-2
# small shapes at T = 256 and 1024 on a CPU (bench/README.md).
QUERY_BLOCK = 128
# Scores of masked keys. Finite, so a query with no visible key (a padding token) gives a
# uniform distribution instead of NaN; such outputs are ignored.
_MASKED = float(jnp.finfo(jnp.float32).min)
_CUDNN_DTYPES = ("bfloat16", "float16")


def cudnn_unfit(config: ModelConfig) -> str | None:
    """Why cuDNN's fused attention cannot run this config on a GPU, or None when it can."""
    if config.dtype not in _CUDNN_DTYPES:
        return f"cuDNN attention needs dtype bfloat16 or float16, dtype is {config.dtype}"
    if config.head_dim % 8 or config.head_dim > 256:
        return f"cuDNN attention needs head_dim a multiple of 8 and at most 256, head_dim is {config.head_dim}"
    return None


def _on_gpu(backend: str | None = None) -> bool:
    return (backend or platform.current()) in ("gpu", "cuda", "rocm")


def resolve_attention(config: ModelConfig, backend: str | None = None) -> tuple[str, str]:
    """(implementation, why) for `config.attention` on `backend` (default: the mesh's platform).

    Raises ValueError when an explicit 'cudnn' cannot run on a GPU (naming the rule it breaks).
    """
    backend = backend or platform.current()
    choice = config.attention
    if choice == "auto":
        if backend == "tpu":
            return "splash", "auto: TPU"
        if _on_gpu(backend):
            unfit = cudnn_unfit(config)
            return ("blockwise", f"auto: GPU, but {unfit}") if unfit else ("cudnn", "auto: GPU")
        return "blockwise", f"auto: {backend.upper()}"
    if choice == "cudnn" and _on_gpu(backend):
        unfit = cudnn_unfit(config)
        if unfit:
            raise ValueError(f"config.model.attention='cudnn': {unfit}; use attention='auto' or 'blockwise'")
    why = "as configured"
    if choice == "splash" and backend != "tpu":
        why += f"; no TPU: the kernel runs in Pallas interpret mode on {backend.upper()}, slowly"
    if choice == "cudnn" and not _on_gpu(backend):
        why += f"; no GPU: jax.nn.dot_product_attention runs its XLA implementation on {backend.upper()}"
    return choice, why


@functools.cache
def _announce(impl: str, why: str, fell_back: bool) -> None:
    """One log line per distinct choice (at trace time); a warning when a GPU misses cuDNN."""
    (logging.warning if fell_back else logging.info)("attention: %s (%s)", impl, why)


def causal_self_attention(config: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array,
                          segment_ids: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(H) + causal [+ window] [+ segment] mask) v for q [B, T, K, G, H], k, v
    [B, T, K, H], token t at index t; `segment_ids` [B, T] int32 (None: one segment per row).
    Returns [B, T, K, G, H] in q's dtype, by the implementation that `resolve_attention` picks."""
    impl, why = resolve_attention(config)
    fell_back = config.attention == "auto" and impl == "blockwise" and _on_gpu()
    if impl == "cudnn" and segment_ids is not None:
        impl, fell_back = "blockwise", True
        why = f"{config.attention}: cuDNN takes no segment ids, so packed documents run blockwise"
    _announce(impl, why, fell_back=fell_back)
    window = config.sliding_window
    if impl == "blockwise":
        return causal_attention(q, k, v, window, QUERY_BLOCK, segment_ids)
    if impl == "splash":
        from gpt2_jax.model.splash import splash_attention  # Pallas: imported only when used

        return splash_attention(q, k, v, window, segment_ids)
    if impl == "cudnn":
        return _dot_product_attention(q, k, v, window, "cudnn" if _on_gpu() else "xla")
    B, T = q.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return attend(config, q, positions, [(k, v, positions)], segment_ids=segment_ids)


def _dot_product_attention(q, k, v, window: int | None, implementation: str) -> jax.Array:
    """jax.nn.dot_product_attention: q as [B, T, N, H] with head n = kv head n // G (its GQA layout)."""
    B, T, K, G, H = q.shape
    local = None if window is None or window >= T else (window - 1, 0)  # (keys left of the query, right)
    # is_causal always: with a window and is_causal=False, cuDNN also attends to the future.
    out = jax.nn.dot_product_attention(q.reshape(B, T, K * G, H), k, v, is_causal=True,
                                       local_window_size=local, implementation=implementation)
    return out.reshape(B, T, K, G, H)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """[B, T], [B, S] int positions (-1 = padding / empty) -> [B, T, S] bool, True = may attend."""
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask &= (qp - kp) < window
    return mask


def attend(config: ModelConfig, q: jax.Array, q_pos: jax.Array, kv_parts, dropout=None,
           segment_ids: jax.Array | None = None) -> jax.Array:
    """The dense rule: softmax attention of q [B, T, K, G, H] over the concatenation of key/value parts.

    Each part is (k [B, S, K, H], v [B, S, K, H], k_pos [B, S]); a key is visible iff
    0 <= k_pos <= q_pos (and q_pos - k_pos < window). Scores are joined, never the keys
    themselves, so attending over cache + new tokens copies no cache. Returns [B, T, K, G, H].
    `segment_ids` [B, T] (one part: the queries' own tokens) also hides keys of other segments.
    """
    if segment_ids is not None and (len(kv_parts) != 1 or kv_parts[0][0].shape[1] != q.shape[1]):
        raise ValueError("segment_ids need the queries' own keys as the one key part (no KV cache)")
    scale = config.head_dim**-0.5
    scores = []
    for k, _, k_pos in kv_parts:
        s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
        mask = attention_mask(q_pos, k_pos, config.sliding_window)  # [B, T, S]
        if segment_ids is not None:
            mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        scores.append(jnp.where(mask[:, None, None], s, _MASKED))  # mask as [B, 1, 1, T, S]
    s = jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0]
    probs = jax.nn.softmax(s, axis=-1)  # [B, K, G, T, S_total], fp32
    if dropout is not None:
        probs = dropout(probs)
    out, start = None, 0
    for k, v, _ in kv_parts:
        p = probs[..., start : start + k.shape[1]].astype(v.dtype)
        o = jnp.einsum("bkgts,bskh->btkgh", p, v, preferred_element_type=jnp.float32)
        out = o if out is None else out + o
        start += k.shape[1]
    return out.astype(q.dtype)
