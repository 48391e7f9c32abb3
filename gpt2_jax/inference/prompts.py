"""Host-side preparation of a batch of prompts: checks, truncation, left padding and bucketing.

The prompts (each repeated `num_samples` times, prompt-major) are left-padded to a common bucketed
length P; padding has position -1, so no token attends to it, and every prompt ends at the same
cache slot. Lengths are rounded up to powers of two (at least 16), so calls of similar size reuse
compiled code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gpt2_jax.model.config import ModelConfig

EOT_ID = 50256  # GPT-2's <|endoftext|>; the same number as gpt2_jax.data.tokenizer.EOT_ID
MIN_BUCKET = 16
TRUNCATE_MODES = ("none", "left")


def context_length(config: ModelConfig) -> int | None:
    """Most tokens (prompt + new) one sequence may hold; None = unbounded (rotary + sliding window)."""
    if config.position_embedding == "rotary" and config.sliding_window is not None:
        return None
    return config.block_size


def bucket(n: int) -> int:
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



@dataclasses.dataclass(frozen=True)
class Batch:
    prompt: np.ndarray  # [B, P] int32, left-padded
    positions: np.ndarray  # [B, P] int32, -1 on padding
    row_limit: np.ndarray  # [B] int32
    gen_len: int  # G: bucketed max_new_tokens


def prepare(
    config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, num_samples: int, truncate: str
) -> Batch:
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
    P = bucket(int(lengths.max()))
    prompt = np.zeros((len(rows), P), np.int32)
    positions = np.full((len(rows), P), -1, np.int32)
    for r, ids in enumerate(rows):
        prompt[r, P - ids.size :] = ids
        positions[r, P - ids.size :] = np.arange(ids.size)
    room = max_new_tokens if context is None else np.minimum(max_new_tokens, context - lengths)
    row_limit = np.broadcast_to(room, lengths.shape).astype(np.int32)
    return Batch(prompt, positions, row_limit, bucket(max_new_tokens))
