"""Speculative decoding: a cheap draft proposes K tokens, one pass of the model checks them all.

    from gpt2_jax.inference.sampling import generate
    new_tokens = generate(config, params, prompts, max_new_tokens=128, temperature=0, speculate=4)

Why it can be faster: a decode step at batch 1 reads every weight to produce one token, and a pass
over K + 1 tokens reads them once too (on a CPU it costs little more: bench/README.md). When the
draft is right, one pass yields up to K + 1 tokens.

One round, for every row at once, inside one jitted `lax.while_loop`:
1. Draft K tokens d_1..d_K to follow the newest token x_0 (position p).
   - prompt lookup (the default, no second model): find the latest earlier occurrence of the last
     n tokens (n = NGRAM_MAX down to NGRAM_MIN) in the prompt and the text so far, and propose the
     K tokens that followed it - repeating the matched stretch where it runs into the present, so
     a loop is continued. A round in which no row finds a match runs a plain one-token pass.
   - a draft model (`draft=(config, params)`, same vocabulary): K greedy steps of a smaller model
     over its own KV cache.
2. Feed [x_0, d_1..d_K] at positions p..p+K: the logits of the token after each.
3. Keep the longest run of drafts the model agrees with, plus one token of the model's own:
   - greedy: d_j is kept while it equals the argmax after d_{j-1}; the argmax where they first
     differ (or after d_K) is added. The output is plain greedy decoding's, token for token (up
     to floating-point rounding: a pass over K + 1 tokens sums in another order than a one-token
     step, which can flip an exact near-tie).
   - sampling: both drafts are deterministic functions of the text so far, a point mass at d. The
     speculative sampling rule (accept with min(1, p/q), else draw from norm(max(0, p - q)))
     becomes: keep d_j with probability p_j(d_j), p_j the model's filtered distribution
     (temperature, top-k, top-p); on rejection draw from p_j without d_j, renormalised, and stop.
     Each new token is then distributed exactly as plain sampling's:
     P(x) = p(d) [x = d] + (1 - p(d)) p(x) [x != d] / (1 - p(d)) = p(x).
4. Roll back: cache slots of rejected drafts get position -1 (hidden; the next round overwrites
   them). With a sliding window the ring has K spare slots, so a rejected write never evicts a
   key still inside the window.

Rules shared with plain decoding (sampling.py): a row stops at eos (not returned) or when its
context is full; rows of a batch advance independently (by different numbers of tokens per round),
so a prompt's greedy output does not depend on the batch. The random numbers are drawn
differently, so a seed gives other samples, from the same distribution.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from gpt2_jax.inference.decode import DecodeWeights, SamplingState, decode_logits
from gpt2_jax.inference.drafts import (  # noqa: F401 - NGRAM_*, filtered_logits: also importable from here
    NGRAM_MAX,
    NGRAM_MIN,
    accept,
    filtered_logits,
    lookup_drafts,
)
from gpt2_jax.inference.options import validate_speculate
from gpt2_jax.inference.prompts import context_length
from gpt2_jax.inference.token_choice import SamplingParams
from gpt2_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Speculation:
    """How to speculate: K drafted tokens per pass; a draft model or (None) prompt lookup."""

    k: int
    draft_config: ModelConfig | None = None
    draft_params: Any = None

    @classmethod
    def create(cls, config: ModelConfig, k: int, draft: tuple[ModelConfig, Any] | None) -> Speculation:
        validate_speculate(k, has_draft=draft is not None)
        if draft is None:
            return cls(k)
        draft_config, draft_params = draft
        check_draft(config, draft_config)
        return cls(k, draft_config, draft_params)


def check_draft(config: ModelConfig, draft: ModelConfig) -> None:
    """ValueError unless the draft model can propose tokens for `config`'s model."""
    if draft.vocab_size != config.vocab_size:
        raise ValueError(
            f"the draft model's vocab_size={draft.vocab_size} differs from the model's {config.vocab_size}; "
            "a draft must share the vocabulary"
        )
    need, have = context_length(config), context_length(draft)
    if have is not None and (need is None or have < need):
        raise ValueError(
            f"the draft model's context ({have} tokens) is shorter than the model's "
            f"({'unbounded' if need is None else need}); a draft must see as far"
        )


@struct.dataclass
class SpecState:
    """What the speculative loop carries. B rows, P prompt columns, G = bucketed new tokens."""

    tokens: jax.Array  # [B, G] int32 new tokens; padding after a row's end
    count: jax.Array  # [B] int32 new tokens written per row
    history: jax.Array  # [B, P + G] int32 the left-padded prompt, then the new tokens
    first: jax.Array  # [B] int32 column of each row's first prompt token in `history`
    cache: tuple  # the model's per-layer KV caches
    draft_cache: tuple | None  # the draft model's, or None (prompt lookup)
    last: jax.Array  # [B] int32 newest token, fed next
    position: jax.Array  # [B] int32 its position
    done: jax.Array  # [B] bool
    row_limit: jax.Array  # [B] int32 most new tokens each row may produce
    rng: jax.Array  # [B] PRNG keys, one per row
    eos_id: jax.Array  # [] int32, -1 = never stop early
    passes: jax.Array  # [B] int32 passes of the model that produced tokens for the row
    proposed: jax.Array  # [B] int32 drafted tokens checked (prompt lookup: rows with a match)
    accepted: jax.Array  # [B] int32 of those, kept


def _widen(config: ModelConfig, caches: tuple, max_len: int, k: int) -> tuple:
    """Plain decoding's per-layer caches -> the speculative loop's, with room for K drafts.

    Positions fed stay below max_len = P + G + K (a row's newest token is below prompt + G, the
    drafts add K). With a sliding window the ring gets K slots beyond the window, so a draft
    written and then rolled back never evicts a key still inside the window. Entries move to slot
    position mod L of the new size.
    """
    w = config.sliding_window
    L = max_len if w is None else min(max_len, w + k)

    def widen(layer):
        attn = layer["attn"]
        B = attn["pos"].shape[0]
        slot = jnp.where(attn["pos"] >= 0, attn["pos"] % L, L)  # [B, L_old]; L: dropped
        rows = jnp.arange(B)[:, None]
        new = {"pos": jnp.full((B, L), -1, jnp.int32).at[rows, slot].set(attn["pos"], mode="drop")}
        k, v = attn["k"], attn["v"]  # [B, K, L, H] and [B, K, H, L]
        K, H = k.shape[1], k.shape[3]
        # Indexed by [B, L_old] pairs around the other axes, each update is [B, L_old, K, H].
        new["k"] = jnp.zeros((B, K, L, H), k.dtype).at[rows, :, slot].set(k.swapaxes(1, 2), mode="drop")
        new["v"] = jnp.zeros((B, K, H, L), v.dtype).at[rows, :, :, slot].set(v.transpose(0, 3, 1, 2), mode="drop")
        return {**layer, "attn": new}

    return tuple(widen(layer) for layer in caches)


def start(config: ModelConfig, k: int, draft_config: ModelConfig | None, state: SamplingState,
          draft_state: SamplingState | None, prompt, positions) -> SpecState:
    """Plain decoding's state after the prefill (and the draft model's) -> the first round's."""
    B, P = prompt.shape
    G = state.tokens.shape[1]
    zeros = jnp.zeros((B,), jnp.int32)
    return SpecState(
        tokens=state.tokens,
        count=zeros,
        history=jnp.concatenate([prompt, jnp.zeros((B, G), jnp.int32)], axis=1),
        first=P - 1 - positions[:, -1],
        cache=_widen(config, state.cache, P + G + k, k),
        draft_cache=None if draft_state is None else _widen(draft_config, draft_state.cache, P + G + k, k),
        last=state.last,
        position=state.position,
        done=state.done,
        row_limit=state.row_limit,
        rng=state.rng,
        eos_id=state.eos_id,
        passes=zeros,
        proposed=zeros,
        accepted=zeros,
    )


@dataclasses.dataclass(frozen=True)
class SpeculationStats:
    """What the drafts did in one generate call, summed over rows."""

    passes: int  # passes of the model (each yields 1 + the drafts it kept)
    proposed: int  # drafted tokens checked (prompt lookup: only where a match was found)
    accepted: int  # drafted tokens kept
    new_tokens: int  # tokens written (eos included)

    @classmethod
    def of(cls, state: SpecState) -> SpeculationStats:
        total = lambda x: int(jax.device_get(x).sum())  # noqa: E731
        return cls(total(state.passes), total(state.proposed), total(state.accepted), total(state.count))

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens kept."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.new_tokens / self.passes if self.passes else 0.0


# ----------------------------------------------------------------------------- drafts


def _draft_model_drafts(draft_config: ModelConfig, weights: DecodeWeights, state: SpecState, k: int):
    """K greedy tokens of the draft model -> (drafts [B, k], its extended caches).

    Its first step feeds the token before the newest one as well: after a round that kept all K
    drafts, the draft model never saw d_K. That token's cached entry, if any, is hidden first: a
    key in both the cache and the fed block would be attended to twice.
    """
    P = state.history.shape[1] - state.tokens.shape[1]
    prev = jnp.take_along_axis(state.history, (P + state.count - 2)[:, None], axis=1)[:, 0]
    fed = jnp.stack([prev, state.last], axis=1)  # [B, 2]
    pos = state.position[:, None] + jnp.arange(-1, 1)[None, :]  # [B, 2]
    pos = jnp.where(state.done[:, None] | (pos < 0), -1, pos)
    cache = _rollback(state.draft_cache, state.position - 1)
    logits, cache = decode_logits(draft_config, weights, cache, fed, pos)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]

    def step(carry, j):
        token, cache = carry
        p = jnp.where(state.done, -1, state.position + j)[:, None]
        logits, cache = decode_logits(draft_config, weights, cache, token[:, None], p)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return (nxt, cache), nxt

    (_, cache), rest = jax.lax.scan(step, (token, cache), jnp.arange(1, k))  # rest [k-1, B]
    return jnp.concatenate([token[:, None], rest.T], axis=1), cache


def _rollback(caches: tuple, position: jax.Array) -> tuple:
    """Hides every cached entry at or after each row's `position` [B] (the newest, unfed token)."""
    def hide(layer):
        attn = layer["attn"]
        return {**layer, "attn": {**attn, "pos": jnp.where(attn["pos"] >= position[:, None], -1, attn["pos"])}}

    return tuple(hide(layer) for layer in caches)


def _round(config: ModelConfig, weights: DecodeWeights, sp: SamplingParams, state: SpecState,
           drafts: jax.Array, found: jax.Array) -> SpecState:
    """One pass of the model over [last, drafts [B, K]] (K may be 0), then acceptance and rollback."""
    B, K = drafts.shape
    W = K + 1
    G = state.tokens.shape[1]
    P = state.history.shape[1] - G
    fed = jnp.concatenate([state.last[:, None], drafts], axis=1)  # [B, W]
    pos = jnp.where(state.done[:, None], -1, state.position[:, None] + jnp.arange(W)[None, :])  # [B, W]
    logits, cache = decode_logits(config, weights, state.cache, fed, pos)  # [B, W, V]
    keys = jax.vmap(jax.random.fold_in)(state.rng, state.count)  # [B]: count grows every round
    kept, bonus = accept(logits, drafts, keys, sp)

    j = jnp.arange(W)[None, :]  # [1, W]
    new = jnp.where(j < kept[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), bonus[:, None])  # [B, W]
    n = jnp.minimum(kept + 1, state.row_limit - state.count)  # [B] clipped to the context room
    is_eos = (new == state.eos_id) & (j < n[:, None])
    hit_eos = jnp.any(is_eos, axis=1)
    n = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, n)  # eos is written (then cut on the host)
    active = ~state.done
    n = jnp.where(active, n, 0)

    rows = jnp.arange(B)[:, None]
    col = jnp.where(j < n[:, None], state.count[:, None] + j, G)  # G: out of range, dropped
    count = state.count + n
    position = state.position + n
    drafted = active & found
    return state.replace(
        tokens=state.tokens.at[rows, col].set(new, mode="drop"),
        history=state.history.at[rows, jnp.where(col < G, P + col, P + G)].set(new, mode="drop"),
        count=count,
        cache=_rollback(cache, position),
        last=jnp.where(n > 0, jnp.take_along_axis(new, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0], state.last),
        position=position,
        done=state.done | hit_eos | (count >= state.row_limit),
        passes=state.passes + active,
        proposed=state.proposed + jnp.where(drafted, K, 0),
        accepted=state.accepted + jnp.where(drafted, kept, 0),
    )


def decode_loop(config: ModelConfig, k: int, draft_config: ModelConfig | None, weights, sp: SamplingParams,
                state: SpecState, limit) -> SpecState:
    """Rounds until every row is done or has `limit` tokens. weights: DecodeWeights, or a pair
    (the model's, the draft model's)."""
    P = state.history.shape[1] - state.tokens.shape[1]

    def lookup_round(s):
        drafts, found = lookup_drafts(s.history, s.first, P + s.count, k)
        found &= ~s.done
        # No row has a match: a one-token pass (cheaper than checking K guesses).
        return jax.lax.cond(
            jnp.any(found),
            lambda: _round(config, weights, sp, s, drafts, found),
            lambda: _round(config, weights, sp, s, drafts[:, :0], found),
        )

    def draft_round(s):
        target, draft = weights
        drafts, draft_cache = _draft_model_drafts(draft_config, draft, s, k)
        s = _round(config, target, sp, s.replace(draft_cache=draft_cache), drafts, ~s.done)
        return s.replace(draft_cache=_rollback(s.draft_cache, s.position))

    return jax.lax.while_loop(
        lambda s: jnp.any(~s.done & (s.count < limit)),
        lookup_round if draft_config is None else draft_round,
        state,
    )
