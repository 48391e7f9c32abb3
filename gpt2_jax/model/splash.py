"""Causal self-attention by Pallas splash attention, the TPU's fused (flash) kernel.

The kernel (jax.experimental.pallas.ops.tpu.splash_attention) attends one sequence at a time:
q [N, T, H], k and v [K, T, H] with N a multiple of K (grouped queries), and takes its mask as
an object (causal, or causal AND a local window) from which it skips whole blocks of the score
matrix. Here it is vmapped over the batch and, inside a mesh, run under `shard_map` with the
batch split as the "batch" logical axis is and the heads split as "heads" / "kv_heads" are, so
each device runs the kernel on its own sequences and heads (MaxText and Levanter do the same).

Off TPU the same kernel runs in Pallas interpret mode: slow, but the very code a TPU runs, which
is how the CPU tests check it against the dense rule.

Two things the kernel does not do, done here: it has no softmax scale (q is scaled first), and
its blocks must divide the sequence, so T is padded with zeros to a multiple of the block. Padded
keys sit after every real query, so the causal mask already hides them; padded queries' rows are
cut from the output (their gradients are zero).

Packed documents go to the kernel as its `SegmentIds` (the same ids for queries and keys): it ANDs
them with the causal (and window) mask inside each block. Padding gets segment -1, which no real
token carries, so a padded query sees only padded keys (never an empty row).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from gpt2_jax.model import platform

# The kernel's key blocks must be multiples of the TPU's 128 lanes. 512 is MaxText's default for
# long sequences; shorter (padded) sequences take the largest of these that divides them.
_BLOCKS = (512, 256, 128)
_LANES = 128

# Logical names of the kernel's operand axes ([B, N, T, H] and [B, K, T, H]); sharding.py maps them.
_Q_AXES = ("batch", "heads", None, None)
_KV_AXES = ("batch", "kv_heads", None, None)
_SEGMENT_AXES = ("batch", None)


def _block(T: int) -> int:
    return next(b for b in _BLOCKS if T % b == 0)


def _kernel(num_heads: int, T: int, window: int | None, interpret: bool):
    """The splash kernel for `num_heads` query heads over a (padded) length T. Built while tracing
    (it holds the mask's block structure as arrays, so it is not cached across traces)."""
    mask = mask_lib.CausalMask((T, T))
    if window is not None and window < T:
        # LocalMask's window is (keys to the left, keys to the right) of the query, itself not counted.
        mask = mask & mask_lib.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    b = _block(T)
    sizes = kernel_lib.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                  block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([mask] * num_heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, window: int | None,
           interpret: bool) -> jax.Array:
    """q [B, N, T, H] (already scaled), k, v [B, K, T, H], segment_ids [B, T] or None -> [B, N, T, H],
    on one device's shard."""
    B, N, T, H = q.shape
    padded = -(-T // _LANES) * _LANES
    if padded != T:
        pad = ((0, 0), (0, 0), (0, padded - T), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - T)), constant_values=-1)
    kernel = _kernel(N, padded, window, interpret)
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(q=s, kv=s)))(
            q, k, v, segment_ids)
    return out[:, :, :T]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None,
                     segment_ids: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(H) + causal mask) v for q [B, T, K, G, H], k, v [B, T, K, H].

    Token t attends to tokens max(0, t - window + 1) .. t, and with `segment_ids` [B, T] int32 only
    to those of its own segment. Returns [B, T, K, G, H] in q's dtype.
    Inside a mesh (jax.set_mesh + the logical axis rules) the kernel runs per shard.
    """
    B, T, K, G, H = q.shape
    interpret = platform.current() != "tpu"  # the mesh's devices: a TPU program compiled on a CPU host
    qh = (q * jnp.asarray(H**-0.5, q.dtype)).transpose(0, 2, 3, 1, 4).reshape(B, K * G, T, H)  # [B, N, T, H]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]

    attend = functools.partial(_local, window=window, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        q_spec = nn.logical_to_mesh_axes(_Q_AXES)
        kv_spec = nn.logical_to_mesh_axes(_KV_AXES)
        seg_spec = None if segment_ids is None else nn.logical_to_mesh_axes(_SEGMENT_AXES)
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                               check_vma=False)
    out = attend(qh, kh, vh, segment_ids)  # [B, N, T, H]
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4)

