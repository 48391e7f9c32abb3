"""Token choice: the next token from a row's logits - greedy, or a sample under temperature, top-k
and top-p. Pure functions of [B, V] logits, shared by plain and speculative decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from gpt2_jax.inference.options import validate_sampling


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
    def create(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
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


def top_k_candidates(logits: jax.Array, bucket: int, top_k, top_p) -> tuple[jax.Array, jax.Array]:
    """The top_k most likely tokens, then the top-p nucleus of those (renormalised).

    logits [B, V] -> (candidate logits [B, C], -inf where filtered out; their token ids [B, C]),
    C = bucket >= top_k. lax.top_k is a partial sort (a full sort of 50k logits per row costs
    more than a small model's decode step on a CPU) and breaks ties by token id, like argmax.
    """
    values, ids = jax.lax.top_k(logits, bucket)  # [B, C], descending
    rank = jnp.arange(bucket)[None, :]
    values = jnp.where(rank < top_k, values, -jnp.inf)
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely candidates
    return jnp.where(mass_before < top_p, values, -jnp.inf), ids


def nucleus_mask(logits: jax.Array, top_p) -> jax.Array:
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
    lo, _ = jax.lax.fori_loop(0, 31, halve, (lo, hi), unroll=True)  # unrolled: several times faster on CPU
    return bits >= lo[:, None]


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float | jax.Array = 1.0) -> jax.Array:
    """Sets logits outside the top-k / top-p set to -inf. logits [B, V] float32.

    top-k keeps the k largest (0 = all; ties broken by token id). top-p then keeps, of those, the
    smallest set whose probability (renormalised after top-k) reaches p; the most likely token
    is always kept. `next_token` applies the same rules without scattering back to [B, V].
    """
    B, V = logits.shape
    if top_k > 0:
        values, ids = top_k_candidates(logits, min(V, 1 << (top_k - 1).bit_length()), top_k, top_p)
        keep = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], ids].set(values > -jnp.inf)
    else:
        keep = nucleus_mask(logits, top_p)
    return jnp.where(keep, logits, -jnp.inf)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One sample per row of softmax(logits). keys [B], logits [B, V] float32 -> [B] int32.

    Inverse-CDF sampling: one uniform number per row. jax.random.categorical draws V Gumbel
    numbers per row instead, which for GPT-2's 50k vocabulary on a CPU costs more than the rest
    of a small model's step.
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
        values, ids = top_k_candidates(logits, min(V, sp.top_k_bucket), sp.top_k, top_p)
        choice = categorical(keys, values)  # [B] index into the candidates
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if sp.use_top_p:
        logits = jnp.where(nucleus_mask(logits, top_p), logits, -jnp.inf)
    return categorical(keys, logits)

