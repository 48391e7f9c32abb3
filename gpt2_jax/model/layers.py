"""Transformer layers: attention (MHA / GQA / MQA, rotary, sliding window, KV cache), MLP, Block.

Einsum letters: B batch, T query length, S key length, E n_embd, N query heads, K kv heads,
G = N // K query heads per kv head, H head_dim, F mlp width.

Positions: `positions=None` means token t sits at position t with no padding (training, evaluation of full
rows); attention then runs by the implementation `config.attention` picks (gpt2_jax/model/attention.py:
blockwise, splash, cuDNN or dense). Otherwise every token carries its position, -1 marks padding, and the mask
is derived from positions alone (key visible iff 0 <= k_pos <= q_pos and, with a window, q_pos - k_pos <
window), so left-padded prompts and a ring-buffer KV cache share one rule.  Packed documents: with
`segment_ids` [B, T] the rows are whole again (token t at index t, no padding, no cache) and `positions` only
place tokens for rotary and learned embeddings (they restart at each document); a key is visible iff its index
is at most the query's, its segment id is the query's and, with a window, it is fewer than `window` tokens
back. Decoding takes no segment ids.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gpt2_jax.model.attention import attend, causal_self_attention
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.kv_cache import attend_with_cache

# Logical names of activation axes, used for sharding constraints at block boundaries.
# Parameter axes are named where each parameter is created. sharding.py maps both to mesh axes.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACTIVATION_AXES = (BATCH, LENGTH, ACT_EMBED)


def param_init(std: float, axes: tuple[str | None, ...]):
    """Normal(0, std) init with logical axis names; std 0 means zeros."""
    init = nn.initializers.normal(std) if std > 0 else nn.initializers.zeros_init()
    return nn.with_logical_partitioning(init, axes)


def zeros_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def layer_norm(config: ModelConfig, name: str | None) -> nn.Module:
    """The model's normalisation over E: GPT-2's LayerNorm, or RMSNorm (`config.norm`)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
                          scale_init=ones_init(("embed",)), name=name)
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        scale_init=ones_init(("embed",)),
        bias_init=zeros_init(("embed",)),
        name=name,
    )


def head_norm(config: ModelConfig, name: str) -> nn.RMSNorm:
    """QK-norm: RMSNorm of each head's q or k over head_dim, one learned gain [H] shared by the heads."""
    return nn.RMSNorm(epsilon=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
                      scale_init=ones_init(("head_dim",)), name=name)


def residual_std(config: ModelConfig) -> float:
    """Init std of the projections that write into the residual stream (attention out, MLP proj):
    GPT-2 scales 0.02 by depth; zero_init_proj starts them at zero, so each block begins as identity."""
    return 0.0 if config.zero_init_proj else 0.02 / (2 * config.n_layer) ** 0.5


class Linear(nn.Module):
    """y = x . W + b, contracting the last `n_in` axes of x with W [*in, *out_shape].

    Written out (rather than nn.DenseGeneral) so multi-axis kernels such as q [E, N, H] are
    created at their real shape, which their logical axis names and sharding rules refer to.
    (Decoding one row at a time may store the kernels transposed: gpt2_jax/inference/decode.py.)
    """

    out_shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of the kernel's axes: inputs, then outputs
    std: float
    dtype: str
    param_dtype: str
    n_in: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.n_in :]
        bias = self.param("bias", zeros_init(self.axes[self.n_in :]), self.out_shape, self.param_dtype)
        kernel = self.param("kernel", param_init(self.std, self.axes), in_shape + self.out_shape, self.param_dtype)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        return jnp.tensordot(x, kernel, axes=self.n_in) + bias


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding ("rotate half" layout). x [B, T, N, H], positions [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    """Causal self-attention with n_kv_head key/value heads shared by groups of query heads.

    With `decode=True` the module keeps a KV cache in the "cache" collection, a ring buffer of
    keys, values and their positions (gpt2_jax/model/kv_cache.py).
    """

    config: ModelConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array | None, segment_ids: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        B, T, _ = x.shape
        if segment_ids is not None and self.decode:
            raise ValueError("segment_ids are not supported with decode=True (the KV cache); pass None")
        drop = None
        if cfg.dropout > 0.0 and not self.deterministic:
            drop = nn.Dropout(rate=cfg.dropout, deterministic=False)
        whole_rows = (positions is None or segment_ids is not None) and not self.decode and drop is None
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        N, K, H = cfg.n_head, cfg.kv_heads, cfg.head_dim
        G = N // K
        def dense(out_shape, axes, name):
            return Linear(out_shape, ("embed",) + axes, 0.02, cfg.dtype, cfg.param_dtype, name=name)

        # Named for the remat policy 'save_qkv' (gpt2.py), which keeps these two and recomputes the rest.
        q = checkpoint_name(dense((N, H), ("heads", "head_dim"), "q")(x), "q_proj")  # [B, T, N, H]
        kv = checkpoint_name(dense((2, K, H), ("kv", "kv_heads", "head_dim"), "kv")(x), "kv_proj")  # [B, T, 2, K, H]
        k, v = kv[:, :, 0], kv[:, :, 1]  # [B, T, K, H]
        if cfg.qk_norm:  # before rotary, so the rotation acts on unit-RMS vectors
            q, k = head_norm(cfg, "q_norm")(q), head_norm(cfg, "k_norm")(k)
        if cfg.position_embedding == "rotary":
            q = apply_rotary(q, positions, cfg.rope_theta)
            k = apply_rotary(k, positions, cfg.rope_theta)
        q = q.reshape(B, T, K, G, H)  # query heads grouped by the kv head they share

        if whole_rows:
            out = causal_self_attention(cfg, q, k, v, segment_ids)
        elif segment_ids is not None:  # dropout on the probabilities: the dense rule, masked by index
            index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            out = attend(cfg, q, index, [(k, v, index)], drop, segment_ids=segment_ids)
        elif not self.decode:
            out = attend(cfg, q, positions, [(k, v, positions)], drop)
        else:  # the KV cache (gpt2_jax/model/kv_cache.py)
            out = attend_with_cache(self, cfg, q, k, v, positions, drop)
        out = out.reshape(B, T, N, H)
        return Linear((cfg.n_embd,), ("heads", "head_dim", "embed"), residual_std(cfg), cfg.dtype,
                      cfg.param_dtype, n_in=2, name="out")(out)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """GPT-2's "gelu_new": jax.nn.gelu(x, approximate=True), with a hand-written backward.

    Autodiff of the tanh formula keeps about six [B, T, F] intermediates per layer for the
    backward pass; this keeps only x and recomputes tanh there (one fused elementwise pass).
    """
    return jax.nn.gelu(x, approximate=True)


_GELU_C = (2.0 / jnp.pi) ** 0.5


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    xf = x.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (xf + 0.044715 * xf**3))
    # d/dx 0.5 x (1 + t) = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)
    grad = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * xf * xf)
    return ((g.astype(jnp.float32) * grad).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def relu2(x: jax.Array) -> jax.Array:
    """relu(x) ** 2 (So et al. 2021, "Primer"), the modern recipe's MLP activation."""
    return jnp.square(jax.nn.relu(x))


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = Linear((cfg.mlp_dim,), ("embed", "mlp"), 0.02, cfg.dtype, cfg.param_dtype, name="fc")(x)  # [B, T, F]
        h = gelu(h) if cfg.mlp_activation == "gelu" else relu2(h)
        return Linear((cfg.n_embd,), ("mlp", "embed"), residual_std(cfg), cfg.dtype, cfg.param_dtype,
                      name="proj")(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block. Returns (x, None) so it can be the body of nn.scan."""

    config: ModelConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array | None, segment_ids: jax.Array | None = None):
        cfg = self.config
        drop = lambda y: nn.Dropout(rate=cfg.dropout)(y, deterministic=self.deterministic)  # noqa: E731
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        h = layer_norm(cfg, "ln_1")(x)
        x = x + drop(Attention(cfg, self.deterministic, self.decode, name="attn")(h, positions, segment_ids))
        h = layer_norm(cfg, "ln_2")(x)
        x = x + drop(MLP(cfg, name="mlp")(h))
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        return x, None
