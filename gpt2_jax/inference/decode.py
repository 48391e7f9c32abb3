"""The decode state and loop: a jitted prefill fills the KV cache, then one `lax.while_loop` (no
host round trip per token) feeds each row's newest token and chooses the next.

The prefill runs the first P-1 prompt columns through the model, filling the cache (its logits
are never used, so XLA drops the vocabulary projection). Each decode step then feeds each row's
newest token - first the prompt's last one - at position = the row's length so far. Each row stops
on its own (eos, or its context room); finished rows emit padding until every row is done. The
step runs the model's blocks one by one over unstacked weights (`DecodeWeights`: faster on a CPU
than GPT2's scan over stacked weights; BENCHMARKS.md, "Where a decode token's time went").
"""

from __future__ import annotations

import functools
import math
import weakref

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from gpt2_jax.inference.token_choice import SamplingParams, next_token
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import GPT2, embed_inputs, output_head, output_logits, position_embedding, token_embedding
from gpt2_jax.model.layers import Block, Linear, layer_norm

# Fewest new tokens for which one-row decoding stores its kernels [out, in]: transposing the block
# weights once costs about what 30 one-row steps save (measured on the 124M model; BENCHMARKS.md).
MATVEC_MIN_TOKENS = 32


@functools.partial(jax.jit, static_argnums=1)
def _unstack(tree, n: int) -> tuple:
    """A tree of arrays stacked along a leading axis of size n -> n trees of separate arrays."""
    return tuple(jax.tree_util.tree_map(lambda x: x[i], tree) for i in range(n))


def _matvec_layout(tree, name: str = ""):
    """A block's weights with each Linear's `kernel` [*in, *out] stored as `kernel_t` [*out, *in]."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "kernel":
            n_in = 2 if name == "out" else 1  # attn.out contracts [N, H]; every other Linear one axis
            def to_matrix(x, n_in=n_in):  # [*in, *out] -> [prod(out), prod(in)]
                return x.reshape(math.prod(x.shape[:n_in]), -1).T

            out["kernel_t"] = jax.tree_util.tree_map(to_matrix, value)
        else:
            out[key] = _matvec_layout(value, key)
    return out


@functools.partial(jax.jit, static_argnums=1)
def _unstack_matvec(tree, n: int) -> tuple:
    """_unstack, each layer's kernels stored [*out, *in] (see DecodeWeights.from_params)."""
    return tuple(_matvec_layout(layer) for layer in _unstack(tree, n))


def _matvec_linear(next_fun, args, kwargs, context):
    """Runs a `Linear` whose weights hold `kernel_t` [prod(out), prod(in)] (the matvec layout) as
    x . kernel_t^T; every other module call as it is. Same values as Linear with its `kernel`."""
    module = context.module
    if not (isinstance(module, Linear) and context.method_name == "__call__"
            and module.has_variable("params", "kernel_t")):
        return next_fun(*args, **kwargs)
    (x,) = args
    kernel_t = module.get_variable("params", "kernel_t").astype(module.dtype)
    bias = module.get_variable("params", "bias").astype(module.dtype)
    rows = x.reshape(x.shape[: x.ndim - module.n_in] + (-1,)).astype(module.dtype)  # [..., in]
    y = jax.lax.dot_general(rows, kernel_t, (((rows.ndim - 1,), (1,)), ((), ())))
    return y.reshape(y.shape[:-1] + module.out_shape) + bias


@struct.dataclass
class DecodeWeights:
    """The model's weights laid out for the decode step: every layer's as separate arrays.

    GPT2 scans one block over weights stacked along a layer axis. A decode step is bound by
    reading the weights, and each scan iteration first copies its layer's slice out of the
    stack: on a CPU that copy nearly doubles the 124M model's step (BENCHMARKS.md). Unstacking
    once per call costs one copy of the block weights, done by one jitted program (separate
    slicing ops, one dispatch each, were several times slower).
    """

    top: dict  # wte, wpe (learned positions only), ln_f, lm_head (untied heads only)
    layers: tuple  # n_layer trees of one block's weights

    @classmethod
    def from_params(cls, config: ModelConfig, params, matvec: bool = False) -> DecodeWeights:
        """matvec=True stores every block kernel as `kernel_t` [*out, *in] (a copy), for steps
        that feed one token row: XLA:CPU streams a matrix-vector product x . W^T from that layout
        faster than x . W from [*in, *out] (measured 1.3x on the 124M blocks' matrices,
        BENCHMARKS.md). With several rows [*in, *out] is faster."""
        top = {name: tree for name, tree in params.items() if name != "blocks"}
        unstack = _unstack_matvec if matvec else _unstack
        return cls(top=top, layers=unstack(params["blocks"], config.n_layer))


def decode_logits(config: ModelConfig, weights: DecodeWeights, caches: tuple, tokens, positions):
    """tokens, positions [B, W] -> (logits [B, W, V], the per-layer caches extended by W tokens).

    GPT2(config).apply(..., decode=True) computed from the model's own modules, layer by layer
    (see DecodeWeights for why); tests hold it to GPT2's full forward. W is 1 in plain decoding,
    K + 1 when speculative decoding checks K drafted tokens.
    """
    cfg, top = config, weights.top
    wte = token_embedding(cfg, name=None).bind({"params": top["wte"]})
    wpe = position_embedding(cfg, name=None)
    wpe = None if wpe is None else wpe.bind({"params": top["wpe"]})
    x = embed_inputs(cfg, wte, wpe, tokens, positions)  # [B, 1, E]
    block = Block(cfg, deterministic=True, decode=True)
    new_caches = []
    with nn.intercept_methods(_matvec_linear):  # kernels stored [out, in] where DecodeWeights made them so
        for layer, cache in zip(weights.layers, caches):
            (x, _), mut = block.apply({"params": layer, "cache": cache}, x, positions, mutable=["cache"])
            new_caches.append(mut["cache"])
    ln_f = layer_norm(cfg, None).bind({"params": top["ln_f"]})
    head = wte if cfg.tie_embeddings else output_head(cfg, wte, name=None).bind({"params": top["lm_head"]})
    return output_logits(cfg, ln_f, head, x), tuple(new_caches)  # [B, W, V]


# DecodeWeights of the params of recent calls (at most _MAX_DECODE_WEIGHTS), kept while those
# same param arrays live: each entry holds weak references to them, and is dropped when the first
# of them is freed. Calling generate again with the same params skips the copy (several decode
# steps' worth, more with the [out, in] layout), at the cost of keeping one copy of the block
# weights alive between calls.
_DECODE_WEIGHTS: dict[tuple, tuple[list, DecodeWeights]] = {}
_MAX_DECODE_WEIGHTS = 2  # a target model and its draft


def decode_weights(config: ModelConfig, params, matvec: bool = False) -> DecodeWeights:
    """DecodeWeights.from_params, reusing the result of an earlier call with the same param arrays."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    key = (config, matvec, treedef)
    hit = _DECODE_WEIGHTS.get(key)
    if hit is not None and all(r() is x for r, x in zip(hit[0], leaves)):  # same treedef: as many leaves
        return hit[1]
    weights = DecodeWeights.from_params(config, params, matvec)
    try:
        refs = [weakref.ref(x) for x in leaves]
    except TypeError:  # leaves that cannot be weakly referenced: never reused
        return weights
    if key not in _DECODE_WEIGHTS and len(_DECODE_WEIGHTS) >= _MAX_DECODE_WEIGHTS:
        _DECODE_WEIGHTS.pop(next(iter(_DECODE_WEIGHTS)))
    _DECODE_WEIGHTS[key] = (refs, weights)
    weakref.finalize(leaves[0], _forget_decode_weights, key, refs[0])
    return weights


def _forget_decode_weights(key: tuple, ref) -> None:
    entry = _DECODE_WEIGHTS.get(key)
    if entry is not None and entry[0][0] is ref:  # not a newer entry under the same key
        del _DECODE_WEIGHTS[key]


@struct.dataclass
class SamplingState:
    """Everything the decode loop carries. B rows, G = bucketed number of new tokens."""

    tokens: jax.Array  # [B, G] int32 new tokens; padding after a row is done
    cache: tuple  # one KV cache per layer: {"attn": {k [B, K, L, H], v [B, K, H, L], pos [B, L]}}
    last: jax.Array  # [B] int32 newest token of each row, fed at the next step
    position: jax.Array  # [B] int32 position of `last`
    done: jax.Array  # [B] bool
    row_limit: jax.Array  # [B] int32 most new tokens each row may produce (context room)
    step: jax.Array  # [] int32 columns of `tokens` written so far
    rng: jax.Array  # [B] PRNG keys, one per row
    eos_id: jax.Array  # [] int32, -1 = never stop early

    @property
    def count(self) -> jax.Array:
        """[B] columns of `tokens` written per row (every row writes one per step; done rows padding)."""
        return jnp.broadcast_to(self.step, self.done.shape)


def prefill(config: ModelConfig, gen_len: int, params, prompt, positions, row_limit, rng, eos_id) -> SamplingState:
    """prompt, positions [B, P] (left-padded) -> the state before the first decode step."""
    B, P = prompt.shape
    model = GPT2(config)
    cache = model.init_cache(B, P + gen_len)
    _, mut = model.apply(
        {"params": params, "cache": cache}, prompt[:, :-1], positions[:, :-1], decode=True, mutable=["cache"]
    )
    return SamplingState(
        tokens=jnp.full((B, gen_len), jnp.maximum(eos_id, 0), jnp.int32),
        cache=_unstack(mut["cache"]["blocks"], config.n_layer),
        last=prompt[:, -1],
        position=positions[:, -1],
        done=row_limit <= 0,
        row_limit=row_limit,
        step=jnp.zeros((), jnp.int32),
        rng=jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(B)),
        eos_id=eos_id,
    )


def next_logits(config: ModelConfig, weights: DecodeWeights, state: SamplingState) -> tuple[jax.Array, tuple]:
    """Feeds each row's newest token: (logits [B, V] of the token after it, the extended caches)."""
    logits, cache = decode_logits(config, weights, state.cache, state.last[:, None], state.position[:, None])
    return logits[:, 0], cache


def decode_step(
    config: ModelConfig, weights: DecodeWeights, sp: SamplingParams, state: SamplingState
) -> SamplingState:
    logits, cache = next_logits(config, weights, state)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.rng, state.step)
    token = next_token(logits, keys, sp)  # [B]
    token = jnp.where(state.done, jnp.maximum(state.eos_id, 0), token)
    done = state.done | (token == state.eos_id) | (state.step + 1 >= state.row_limit)
    return state.replace(
        tokens=state.tokens.at[:, state.step].set(token),
        cache=cache,
        last=token,
        position=state.position + 1,
        done=done,
        step=state.step + 1,
    )


def decode_loop(
    config: ModelConfig, weights: DecodeWeights, sp: SamplingParams, state: SamplingState, limit
) -> SamplingState:
    """Decode steps until `limit` tokens are written or every row is done."""
    return jax.lax.while_loop(
        lambda s: (s.step < limit) & ~jnp.all(s.done),
        lambda s: decode_step(config, weights, sp, s),
        state,
    )

