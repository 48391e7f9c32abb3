"""Sampling: a jitted prefill over left-padded prompts, then a decode loop over the KV cache.

    from gpt2_jax.inference.sampling import generate
    new_tokens = generate(config, params, [prompt_ids], max_new_tokens=64, temperature=0.8, top_k=200)

How one call runs. The prompts (each repeated `num_samples` times, prompt-major) are left-padded to a
common bucketed length P; padding has position -1, so no token attends to it, and every prompt ends
at the same cache slot. The prefill runs the first P-1 columns through the model, filling the
cache (its logits are never used, so XLA drops the vocabulary projection). The decode loop, one
`lax.while_loop` (no host round trip per token), then feeds each row's newest token - first the
prompt's last one - at position = the row's length so far, and samples the next token from its
logits. Each row stops on its own; finished rows emit padding until every row is done. The
decode step runs the model's blocks one by one over unstacked weights (`DecodeWeights`: ~1.8x
faster on a CPU than GPT2's scan over stacked weights).

Rules:
- eos: a row stops when it samples `eos_id`; the eos token itself is not returned (so a completion
  decodes to clean text). A returned row shorter than `max_new_tokens` therefore means the row
  hit eos or filled the context. `eos_id=None` never stops early.
- length: the context of a model with learned positions, or with rotary positions and full
  attention, is `block_size` tokens (`context_length`). A prompt must leave room for at least one
  new token (at most block_size - 1 tokens), else ValueError - unless `truncate='left'`, which
  drops a prompt's oldest tokens so that prompt + max_new_tokens fits, but keeps at least half
  the context for the prompt. New tokens are clipped, per row, to the room its prompt leaves:
  a full context ends a row like eos does. Rotary positions with a sliding window have no
  limit: the cache is a ring of `window` slots.
- bucketing: prompt length and generation length are rounded up to powers of two (at least 16),
  so calls of similar size reuse compiled code. Compiled executables are cached by their static
  settings and input shapes; sampling values (temperature, top_k, top_p, seed, eos_id) are
  runtime inputs. Static: greedy or not, top-p on or off, and top_k's power-of-two bucket.
- randomness: row r samples step s with fold_in(fold_in(key(seed), r), s), so a row's samples
  depend on the seed and its row index only. Greedy output of a prompt never depends on the
  other prompts in the batch.
- speculate=K: the decode loop is speculative.py's instead, which checks K drafted tokens per
  pass of the model; the rules above hold there too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gpt2_jax import compilation_cache
from gpt2_jax.inference.options import validate_sampling
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import GPT2, embed_inputs, output_head, output_logits, position_embedding, token_embedding
from gpt2_jax.model.layers import Block, layer_norm

if TYPE_CHECKING:
    from gpt2_jax.inference.speculative import Speculation, SpeculationStats

EOT_ID = 50256  # GPT-2's <|endoftext|>; the same number as gpt2_jax.data.tokenizer.EOT_ID
MIN_BUCKET = 16
# Fewest new tokens for which one-row decoding stores its kernels [out, in]: transposing the block
# weights costs about as much as 30 steps save (124M on a 2-core CPU: ~130 ms once, ~4 ms a step).
MATVEC_MIN_TOKENS = 32
TRUNCATE_MODES = ("none", "left")


def context_length(config: ModelConfig) -> int | None:
    """Most tokens (prompt + new) one sequence may hold; None = unbounded (rotary + sliding window)."""
    if config.position_embedding == "rotary" and config.sliding_window is not None:
        return None
    return config.block_size


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


class PromptTooLongError(ValueError):
    """A prompt leaves no room for new tokens in the model's context."""

    def __init__(self, index: int, length: int, context: int, keep: int):
        self.index, self.length, self.context, self.keep = index, length, context, keep
        super().__init__(
            f"prompt {index} has {length} tokens but the model's context is block_size={context} tokens, "
            f"so a prompt can have at most {context - 1}; shorten it or pass truncate='left' "
            f"(keeps its last {keep} tokens)"
        )


# ----------------------------------------------------------------------------- per-step sampler


@struct.dataclass
class SamplingParams:
    """How the next token is chosen. Build with `SamplingParams.create`, which validates.

    The values are runtime inputs of the compiled step. The static fields choose which code is
    compiled: greedy or not, whether top-p is on, and top-k's candidate count (the power of two
    >= top_k, 0 = off), so top_k 33..64 share one executable.
    """

    temperature: jax.Array  # [] float32
    top_k: jax.Array  # [] int32, 0 = no limit
    top_p: jax.Array  # [] float32, 1 = no limit
    greedy: bool = struct.field(pytree_node=False, default=False)
    top_k_bucket: int = struct.field(pytree_node=False, default=0)
    use_top_p: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> "SamplingParams":
        validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        greedy = temperature == 0
        return cls(
            temperature=jnp.float32(temperature),
            top_k=jnp.int32(top_k),
            top_p=jnp.float32(top_p),
            greedy=greedy,
            top_k_bucket=0 if greedy or top_k == 0 else 1 << (int(top_k) - 1).bit_length(),
            use_top_p=not greedy and top_p < 1.0,
        )


def _top_k_candidates(logits: jax.Array, bucket: int, top_k, top_p) -> tuple[jax.Array, jax.Array]:
    """The top_k most likely tokens, then the top-p nucleus of those (renormalised).

    logits [B, V] -> (candidate logits [B, C], -inf where filtered out; their token ids [B, C]),
    C = bucket >= top_k. lax.top_k is a partial sort (a full sort of 50k logits costs ~15 ms
    per row on a CPU) and breaks ties by token id, like argmax.
    """
    values, ids = jax.lax.top_k(logits, bucket)  # [B, C], descending
    rank = jnp.arange(bucket)[None, :]
    values = jnp.where(rank < top_k, values, -jnp.inf)
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely candidates
    return jnp.where(mass_before < top_p, values, -jnp.inf), ids


def _nucleus_mask(logits: jax.Array, top_p) -> jax.Array:
    """[B, V] -> bool [B, V]: the smallest set of most likely tokens whose probability reaches top_p.

    Found without sorting: a bisection for the largest probability threshold t with
    P(prob >= t) >= top_p. Non-negative float32s order like their bit patterns, so 31 halvings
    of the int32 range find t exactly. Tokens tied at t are all kept.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # [B, V]
    target = top_p * jnp.sum(probs, axis=-1)  # [B]; the sum is 1 up to rounding

    def halve(_, bounds):  # invariant: mass(>= lo) >= target > mass(>= hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(jnp.where(bits >= mid[:, None], probs, 0.0), axis=-1) >= target
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo = jnp.zeros(bits.shape[:1], jnp.int32)
    hi = jnp.max(bits, axis=-1) + 1
    lo, _ = jax.lax.fori_loop(0, 31, halve, (lo, hi), unroll=True)  # unrolled: ~3x faster on CPU
    return bits >= lo[:, None]


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float | jax.Array = 1.0) -> jax.Array:
    """Sets logits outside the top-k / top-p set to -inf. logits [B, V] float32.

    top-k keeps the k largest (0 = all; ties broken by token id). top-p then keeps, of those, the
    smallest set whose probability (renormalised after top-k) reaches p; the most likely token
    is always kept. `next_token` applies the same rules without scattering back to [B, V].
    """
    B, V = logits.shape
    if top_k > 0:
        values, ids = _top_k_candidates(logits, min(V, 1 << (top_k - 1).bit_length()), top_k, top_p)
        keep = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], ids].set(values > -jnp.inf)
    else:
        keep = _nucleus_mask(logits, top_p)
    return jnp.where(keep, logits, -jnp.inf)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One sample per row of softmax(logits). keys [B], logits [B, V] float32 -> [B] int32.

    Inverse-CDF sampling: one uniform number per row. jax.random.categorical draws V Gumbel
    numbers per row instead, which costs ~4 ms per row per step for GPT-2's 50k vocabulary on
    a CPU - more than the rest of a small model's step.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)  # [B, V]
    u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]  # [B] in [0, total)
    token = jnp.sum(cdf <= u[:, None], axis=-1)  # first token whose cdf exceeds u: p(token) > 0
    # u can round up to the total (chance ~2^-24): fall back to the last token that can be drawn.
    V = logits.shape[-1]
    last = V - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)
    return jnp.minimum(token, last).astype(jnp.int32)


def next_token(logits: jax.Array, keys: jax.Array, sp: SamplingParams) -> jax.Array:
    """logits [B, V], keys [B] (one PRNG key per row) -> [B] int32: the argmax, or a sample of
    softmax(logits / temperature) restricted to the top-k / top-p set."""
    logits = logits.astype(jnp.float32)
    if sp.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sp.temperature
    V = logits.shape[-1]
    top_p = sp.top_p if sp.use_top_p else 1.0
    if sp.top_k_bucket > 0:
        # Sample among the candidates, then map back to token ids: no [B, V] scatter per step.
        values, ids = _top_k_candidates(logits, min(V, sp.top_k_bucket), sp.top_k, top_p)
        choice = categorical(keys, values)  # [B] index into the candidates
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if sp.use_top_p:
        logits = jnp.where(_nucleus_mask(logits, top_p), logits, -jnp.inf)
    return categorical(keys, logits)


# ----------------------------------------------------------------------------- decode state and loop


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


@struct.dataclass
class DecodeWeights:
    """The model's weights laid out for the decode step: every layer's as separate arrays.

    GPT2 scans one block over weights stacked along a layer axis. A decode step is bound by
    reading the weights, and each scan iteration first copies its layer's slice out of the
    stack: on a CPU the 124M model's step takes ~46 ms that way and ~25 ms with the layers
    apart (Hugging Face: ~24 ms). Unstacking once per call costs one copy of the block weights,
    done by one jitted program (as separate slicing ops, one dispatch each, it took ~170 ms).
    """

    top: dict  # wte, wpe (learned positions only), ln_f, lm_head (untied heads only)
    layers: tuple  # n_layer trees of one block's weights

    @classmethod
    def from_params(cls, config: ModelConfig, params, matvec: bool = False) -> "DecodeWeights":
        """matvec=True stores every block kernel as `kernel_t` [*out, *in] (a copy), for steps
        that feed one token row: XLA:CPU streams a matrix-vector product x . W^T from that layout
        faster than x . W from [*in, *out] (measured 1.3x on the 124M blocks' matrices,
        BENCHMARKS.md). With several rows [*in, *out] is faster."""
        top = {name: tree for name, tree in params.items() if name != "blocks"}
        unstack = _unstack_matvec if matvec else _unstack
        return cls(top=top, layers=unstack(params["blocks"], config.n_layer))


def _decode_logits(config: ModelConfig, weights: DecodeWeights, caches: tuple, tokens, positions):
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
    for layer, cache in zip(weights.layers, caches):
        (x, _), mut = block.apply({"params": layer, "cache": cache}, x, positions, mutable=["cache"])
        new_caches.append(mut["cache"])
    ln_f = layer_norm(cfg, None).bind({"params": top["ln_f"]})
    head = wte if cfg.tie_embeddings else output_head(cfg, wte, name=None).bind({"params": top["lm_head"]})
    return output_logits(cfg, ln_f, head, x), tuple(new_caches)  # [B, W, V]


# DecodeWeights of the params of recent calls (at most _MAX_DECODE_WEIGHTS), kept while those
# same param arrays live: each entry holds weak references to them, and is dropped when the first
# of them is freed. Calling generate again with the same params skips the copy (124M on a 2-core
# CPU: ~30 ms, ~130 ms with the [out, in] layout), at the cost of keeping one copy of the block
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


def _prefill(config: ModelConfig, gen_len: int, params, prompt, positions, row_limit, rng, eos_id) -> SamplingState:
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


def _next_logits(config: ModelConfig, weights: DecodeWeights, state: SamplingState) -> tuple[jax.Array, tuple]:
    """Feeds each row's newest token: (logits [B, V] of the token after it, the extended caches)."""
    logits, cache = _decode_logits(config, weights, state.cache, state.last[:, None], state.position[:, None])
    return logits[:, 0], cache


def _decode_step(
    config: ModelConfig, weights: DecodeWeights, sp: SamplingParams, state: SamplingState
) -> SamplingState:
    logits, cache = _next_logits(config, weights, state)
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


def _decode(
    config: ModelConfig, weights: DecodeWeights, sp: SamplingParams, state: SamplingState, limit
) -> SamplingState:
    """Decode steps until `limit` tokens are written or every row is done."""
    return jax.lax.while_loop(
        lambda s: (s.step < limit) & ~jnp.all(s.done),
        lambda s: _decode_step(config, weights, sp, s),
        state,
    )


# ----------------------------------------------------------------------------- compiled-code cache

_EXECUTABLES: dict[tuple, Any] = {}
_MAX_EXECUTABLES = 64


def _compiled(fn: Callable, static: tuple, *args, donate_argnums: tuple[int, ...] = ()) -> tuple[Any, float]:
    """(executable of fn(*static, *args) for these argument shapes, seconds spent compiling it now).

    Compiling ahead of time (rather than on a jitted function's first call) lets callers report
    throughput without compilation in it.
    """
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (fn.__name__, static, treedef, donate_argnums, tuple((jax.typeof(x), x.sharding) for x in leaves))
    if key in _EXECUTABLES:
        return _EXECUTABLES[key], 0.0
    start = time.perf_counter()
    bound = lambda *a: fn(*static, *a)  # noqa: E731
    # generate.py keeps these programs traced on disk (compilation_cache.enable(traced_programs=True)).
    executable = compilation_cache.compile_traced(
        bound, args, key=(fn.__module__, fn.__qualname__, static), donate_argnums=donate_argnums
    )
    if len(_EXECUTABLES) >= _MAX_EXECUTABLES:
        _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
    _EXECUTABLES[key] = executable
    return executable, time.perf_counter() - start


# ----------------------------------------------------------------------------- host side


@dataclasses.dataclass(frozen=True)
class _Batch:
    prompt: np.ndarray  # [B, P] int32, left-padded
    positions: np.ndarray  # [B, P] int32, -1 on padding
    row_limit: np.ndarray  # [B] int32
    gen_len: int  # G: bucketed max_new_tokens


def _prepare(
    config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, num_samples: int, truncate: str
) -> _Batch:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if truncate not in TRUNCATE_MODES:
        raise ValueError(f"truncate={truncate!r} must be one of {TRUNCATE_MODES}")
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass a list of token-id lists")
    context = context_length(config)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError(f"prompt {i} is empty; it needs at least one token (e.g. <|endoftext|> = {EOT_ID})")
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= config.vocab_size)][0])
            raise ValueError(f"prompt {i} holds token id {bad}, outside the vocabulary [0, {config.vocab_size})")
        if context is not None:
            keep = max(1, context - max_new_tokens, context // 2)
            if truncate == "left" and ids.size > keep:
                ids = ids[-keep:]
            elif ids.size >= context:
                raise PromptTooLongError(i, int(ids.size), context, keep)
        rows += [ids] * num_samples
    lengths = np.array([r.size for r in rows])
    P = _bucket(int(lengths.max()))
    prompt = np.zeros((len(rows), P), np.int32)
    positions = np.full((len(rows), P), -1, np.int32)
    for r, ids in enumerate(rows):
        prompt[r, P - ids.size :] = ids
        positions[r, P - ids.size :] = np.arange(ids.size)
    room = max_new_tokens if context is None else np.minimum(max_new_tokens, context - lengths)
    row_limit = np.broadcast_to(room, lengths.shape).astype(np.int32)
    return _Batch(prompt, positions, row_limit, _bucket(max_new_tokens))


def _as_device_params(params):
    return jax.tree_util.tree_map(jnp.asarray, params)  # numpy (e.g. device_get) -> device arrays


@dataclasses.dataclass(frozen=True)
class Generation:
    """New tokens of every row (prompt-major: prompt 0's samples, then prompt 1's...) and timings."""

    tokens: list[list[int]]
    compile_s: float  # compilation in this call (0 when every executable was cached)
    run_s: float  # prefill + decode, compilation excluded
    speculation: "SpeculationStats | None" = None  # drafts proposed and kept (speculate > 0)


def _finish_row(tokens: np.ndarray, limit: int, eos_id: int | None) -> list[int]:
    row = tokens[:limit].tolist()
    if eos_id is not None and eos_id in row:
        row = row[: row.index(eos_id)]
    return row


class _Run:
    """One prepared batch: compiles and runs prefill, then the decode loop (plain or speculative,
    gpt2_jax/inference/speculative.py) in chunks."""

    def __init__(self, config: ModelConfig, params, batch: _Batch, sp: SamplingParams, seed: int, eos_id: int | None,
                 spec: "Speculation | None" = None):
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} must be an integer")
        self.config, self.sp, self.batch, self.spec = config, sp, batch, spec
        self.params = _as_device_params(params)
        self.weights: DecodeWeights | None = None  # made after the prefill, which uses the stacked params
        self.compile_s = self.run_s = 0.0
        self.eos_id = eos_id
        self._inputs = (
            jnp.asarray(batch.prompt),
            jnp.asarray(batch.positions),
            jnp.asarray(batch.row_limit),
            jax.random.key(seed),
            jnp.int32(-1 if eos_id is None else eos_id),
        )
        # Speculation starts from plain decoding's prefill (one compiled program for both).
        self._prefill, t = _compiled(_prefill, (config, batch.gen_len), self.params, *self._inputs)
        self.compile_s += t
        self._draft_prefill = self.draft_params = None
        self._decode_fn, self._decode_static = _decode, (config,)
        if spec is not None:
            from gpt2_jax.inference import speculative

            self._decode_fn, self._decode_static = speculative._decode, (config, spec.k, spec.draft_config)
            if spec.draft_config is not None:
                self.draft_params = _as_device_params(spec.draft_params)
                self._draft_prefill, t = _compiled(_prefill, (spec.draft_config, batch.gen_len), self.draft_params,
                                                   *self._inputs)
                self.compile_s += t
        self._decode = None  # looked up once: every advance() has the same shapes
        self.state: SamplingState | None = None

    def _first_state(self):
        """Runs the prefill (and, speculating, turns its state into the speculative loop's)."""
        start = time.perf_counter()
        state = jax.block_until_ready(self._prefill(self.params, *self._inputs))
        if self.spec is None:
            self.run_s += time.perf_counter() - start
            return state
        from gpt2_jax.inference import speculative

        draft = None
        if self._draft_prefill is not None:
            draft = jax.block_until_ready(self._draft_prefill(self.draft_params, *self._inputs))
        self.run_s += time.perf_counter() - start
        prompt, positions = self._inputs[:2]
        static = (self.config, self.spec.k, self.spec.draft_config)
        begin, t = _compiled(speculative._start, static, state, draft, prompt, positions)
        self.compile_s += t
        start = time.perf_counter()
        state = jax.block_until_ready(begin(state, draft, prompt, positions))
        self.run_s += time.perf_counter() - start
        return state

    def _decode_weights(self):
        # The [out, in] layout when each step of plain decoding (or of a draft model) feeds one
        # row, and there are enough steps to repay transposing the block weights once.
        matvec = self.batch.prompt.shape[0] == 1 and int(self.batch.row_limit.max()) >= MATVEC_MIN_TOKENS
        weights = decode_weights(self.config, self.params, matvec=matvec and self.spec is None)
        if self.spec is not None and self.spec.draft_config is not None:
            return weights, decode_weights(self.spec.draft_config, self.draft_params, matvec=matvec)
        return weights

    def advance(self, limit: int) -> SamplingState:
        """Runs the decode loop until `limit` tokens per row are written (or all rows are done);
        a speculative round may write a few more."""
        if self.state is None:
            self.state = self._first_state()
            start = time.perf_counter()
            self.weights = jax.block_until_ready(self._decode_weights())
            self.run_s += time.perf_counter() - start
        args = (self.weights, self.sp, self.state, jnp.int32(limit))
        if self._decode is None:
            self._decode, t = _compiled(self._decode_fn, self._decode_static, *args, donate_argnums=(2,))
            self.compile_s += t
        start = time.perf_counter()
        self.state = jax.block_until_ready(self._decode(*args))
        self.run_s += time.perf_counter() - start
        return self.state


def generate_with_stats(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 1,
    eos_id: int | None = EOT_ID,
    truncate: str = "none",
    speculate: int = 0,
    draft: tuple[ModelConfig, Any] | None = None,
) -> Generation:
    """`generate`, also returning compile and run times (and, speculating, the drafts' fate)."""
    sp = SamplingParams.create(temperature, top_k, top_p)
    validate_sampling(num_samples=num_samples)
    spec = _speculation(config, speculate, draft)
    batch = _prepare(config, prompts, max_new_tokens, num_samples, truncate)
    if max_new_tokens == 0:
        return Generation([[] for _ in batch.row_limit], 0.0, 0.0)
    run = _Run(config, params, batch, sp, seed, eos_id, spec)
    state = run.advance(max_new_tokens)
    tokens = np.asarray(state.tokens)
    rows = [_finish_row(tokens[r], int(batch.row_limit[r]), eos_id) for r in range(tokens.shape[0])]
    stats = None
    if spec is not None:
        from gpt2_jax.inference.speculative import SpeculationStats

        stats = SpeculationStats.of(state)
    return Generation(rows, run.compile_s, run.run_s, stats)


def _speculation(config: ModelConfig, speculate: int, draft) -> "Speculation | None":
    """None for plain decoding, else the checked settings of speculative decoding."""
    from gpt2_jax.inference.options import validate_speculate

    validate_speculate(speculate, has_draft=draft is not None)
    if speculate == 0:
        return None
    from gpt2_jax.inference.speculative import Speculation

    return Speculation.create(config, speculate, draft)


def generate(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 1,
    eos_id: int | None = EOT_ID,
    truncate: str = "none",
    speculate: int = 0,
    draft: tuple[ModelConfig, Any] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (each sample), without the prompt; see the module docstring.

    Returns len(prompts) * num_samples lists, prompt-major: [p0 s0, p0 s1, ..., p1 s0, ...].
    temperature=0 is greedy; top_k=0 and top_p=1 switch those filters off. Each row stops at
    `eos_id` (not included in the output) or when its context is full.

    `speculate=K > 0` decodes speculatively (gpt2_jax/inference/speculative.py): K drafted tokens
    per pass of the model, from prompt lookup, or from `draft=(draft_config, draft_params)`, a
    smaller model with the same vocabulary. Greedy output is the same; samples follow the same
    distribution (other draws for the same seed).
    """
    return generate_with_stats(
        config, params, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, num_samples=num_samples, eos_id=eos_id, truncate=truncate,
        speculate=speculate, draft=draft,
    ).tokens


class TokenStream:
    """Iterator over the new tokens of one prompt (one sample), one decode step per token.

    Made by `stream`. The same compiled prefill and decode loop as `generate` run here (the loop
    is asked for one more token per call), so the tokens equal generate(...)[0] for the same
    arguments. `compile_s` and `run_s` (prefill + decode, compilation excluded) grow as it runs.
    """

    def __init__(self, run: _Run):
        self._run, self._limit, self._step = run, int(run.batch.row_limit[0]), 0  # limit <= max_new_tokens

    @property
    def compile_s(self) -> float:
        return self._run.compile_s

    @property
    def run_s(self) -> float:
        return self._run.run_s

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self._step >= self._limit:
            raise StopIteration
        state = self._run.state
        if state is None or int(state.count[0]) <= self._step:  # a speculative pass may have run ahead
            state = self._run.advance(self._step + 1)
        token = int(state.tokens[0, self._step])
        self._step += 1
        if self._run.eos_id is not None and token == self._run.eos_id:
            self._limit = 0
            raise StopIteration
        if bool(state.done[0]):
            self._limit = min(self._limit, int(state.count[0]))  # a speculative round may run ahead
        return token


def stream(
    config: ModelConfig,
    params,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = EOT_ID,
    truncate: str = "none",
    speculate: int = 0,
    draft: tuple[ModelConfig, Any] | None = None,
) -> TokenStream:
    """Like generate(config, params, [prompt], ...)[0], but yields each token as it is produced
    (speculating, a pass's tokens come together).

    Arguments are checked (and the prefill compiled) now; the model runs as the stream is read.
    """
    sp = SamplingParams.create(temperature, top_k, top_p)
    spec = _speculation(config, speculate, draft)
    batch = _prepare(config, [prompt], max_new_tokens, 1, truncate)
    return TokenStream(_Run(config, params, batch, sp, seed, eos_id, spec))
