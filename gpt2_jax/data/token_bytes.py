"""Bits per byte: a next-token loss measured per byte of text, so that models with other tokenizers
(or other window lengths) compare.

    bits per byte = (summed loss of the scored targets, in nats) / ln 2 / (UTF-8 bytes of those targets)

The bytes counted are those the scored target tokens decode to: each GPT-2 token is a fixed byte
string, so a run of tokens decodes to the concatenation of theirs (a character split over two
tokens counts once). `<|endoftext|>` separates documents and is no text: it counts 0 bytes (its
loss still counts), as in nanochat.
"""

from __future__ import annotations

import functools
import math

import numpy as np


@functools.lru_cache(maxsize=1)
def byte_lengths() -> np.ndarray:
    """int64 [vocab]: the UTF-8 bytes GPT-2's token i decodes to (0 for <|endoftext|>)."""
    from gpt2_jax.data.tokenizer import get_tokenizer

    enc = get_tokenizer()
    lengths = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], np.int64)
    lengths[enc.eot_token] = 0
    return lengths


def count_bytes(tokens) -> int:
    """The UTF-8 bytes an array of GPT-2 token ids (any shape) decodes to."""
    tokens = np.asarray(tokens).reshape(-1)
    table = byte_lengths()
    if tokens.size and (tokens.min() < 0 or tokens.max() >= table.size):
        raise ValueError(f"token ids must be in [0, {table.size}) to count their bytes; "
                         f"got {tokens.min()}..{tokens.max()}")
    return int(table[tokens].sum())


def bits_per_byte(mean_loss: float, num_tokens: int, num_bytes: int) -> float:
    """`mean_loss` nats over `num_tokens` scored targets that decode to `num_bytes` bytes -> bits per byte."""
    if num_bytes <= 0:
        raise ValueError(f"no bytes to measure bits per byte over ({num_tokens} tokens decode to {num_bytes})")
    return mean_loss * num_tokens / (math.log(2) * num_bytes)
