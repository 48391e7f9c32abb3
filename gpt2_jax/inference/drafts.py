"""Drafts in speculative decoding (speculative.py runs the rounds): proposing them by prompt
lookup, and the acceptance rule that keeps the output distributed as plain decoding's."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gpt2_jax.inference.token_choice import SamplingParams, categorical, nucleus_mask, top_k_candidates

# Prompt lookup matches the last 3, else 2, else 1 tokens (bench/README.md: on this project's
# benchmark sets a minimum of 1 accepted more tokens per pass than 2 did, at no measurable cost).
NGRAM_MAX = 3
NGRAM_MIN = 1


def lookup_drafts(history: jax.Array, first: jax.Array, end: jax.Array, k: int,
                  ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN) -> tuple[jax.Array, jax.Array]:
    """Prompt lookup. history [B, S] holds each row's text in columns [first, end) ([B] each).

    Returns (drafts [B, k], found [B]): the k tokens that followed the latest earlier occurrence
    of the row's last n tokens, for the largest n in [ngram_min, ngram_max] that has one. Where
    that occurrence ends i < end - 1 tokens back, column i + 1 + (j mod (end - 1 - i)) is draft j:
    past the present the matched stretch repeats, as a loop would. Without a match: the newest
    token, k times (a guess as good as any, and cheap).
    """
    B, S = history.shape
    col = jnp.arange(S)[None, :]  # [1, S] candidate end of an earlier occurrence
    newest = jnp.take_along_axis(history, (end - 1)[:, None], axis=1)  # [B, 1]
    best = jnp.full((B,), -1, jnp.int32)
    for n in range(ngram_max, ngram_min - 1, -1):  # longest first
        match = (col < end[:, None] - 1) & (col - (n - 1) >= first[:, None]) & (end - n >= first)[:, None]
        for j in range(n):  # token j back from the end of both occurrences
            back = jnp.pad(history, ((0, 0), (j, 0)))[:, :S]  # [B, S]: column c holds history[c - j]
            tail = jnp.take_along_axis(history, (end - 1 - j)[:, None], axis=1)  # [B, 1]
            match &= back == tail
        latest = jnp.max(jnp.where(match, col, -1), axis=1).astype(jnp.int32)  # [B]
        best = jnp.where(best < 0, latest, best)
    found = best >= 0
    period = jnp.maximum(end - 1 - best, 1)  # [B]
    cols = best[:, None] + 1 + jnp.arange(k)[None, :] % period[:, None]  # [B, k]
    drafts = jnp.take_along_axis(history, jnp.clip(cols, 0, S - 1), axis=1)
    return jnp.where(found[:, None], drafts, newest), found


def filtered_logits(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """logits [N, V] -> logits / temperature, -inf outside the top-k / top-p set: softmax of this is
    the distribution `next_token` samples from."""
    logits = logits.astype(jnp.float32) / sp.temperature
    N, V = logits.shape
    top_p = sp.top_p if sp.use_top_p else 1.0
    if sp.top_k_bucket > 0:
        values, ids = top_k_candidates(logits, min(V, sp.top_k_bucket), sp.top_k, top_p)
        return jnp.full_like(logits, -jnp.inf).at[jnp.arange(N)[:, None], ids].set(values)
    if sp.use_top_p:
        return jnp.where(nucleus_mask(logits, top_p), logits, -jnp.inf)
    return logits


def accept(logits: jax.Array, drafts: jax.Array, keys: jax.Array, sp: SamplingParams):
    """The acceptance rule. logits [B, K+1, V] after [x_0, d_1..d_K]; drafts [B, K]; keys [B].

    Returns (kept [B]: how many leading drafts are kept, bonus [B]: the model's token after them).
    """
    B, W, V = logits.shape
    K = W - 1
    if sp.greedy:
        best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, W]
        agree = (drafts == best[:, :K]).astype(jnp.int32)
        kept = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)  # [B] leading agreements
        return kept, jnp.take_along_axis(best, kept[:, None], axis=1)[:, 0]
    filt = filtered_logits(logits.reshape(B * W, V), sp).reshape(B, W, V)
    kept = jnp.zeros((B,), jnp.int32)
    last = filt[:, 0]  # [B, V]
    if K > 0:
        logp = jax.nn.log_softmax(filt[:, :K], axis=-1)  # [B, K, V]
        p_draft = jnp.exp(jnp.take_along_axis(logp, drafts[..., None], axis=-1)[..., 0])  # [B, K]
        u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1), (K,)))(keys)  # [B, K]
        kept = jnp.sum(jnp.cumprod((u < p_draft).astype(jnp.int32), axis=1), axis=1)
        last = jnp.take_along_axis(filt, kept[:, None, None], axis=1)[:, 0]  # [B, V]
        rejected = jnp.take_along_axis(drafts, jnp.minimum(kept, K - 1)[:, None], axis=1)  # [B, 1]
        drop = (kept < K)[:, None] & (jnp.arange(V)[None, :] == rejected)
        last = jnp.where(drop, -jnp.inf, last)  # the residual: p without the rejected draft
    bonus = categorical(jax.vmap(lambda key: jax.random.fold_in(key, 0))(keys), last)
    return kept, bonus
