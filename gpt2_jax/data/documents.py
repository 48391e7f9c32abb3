"""Packed documents in a training window: where each begins, as the model's positions and segment ids.

A window is cut from one stream of documents, each preceded by `<|endoftext|>` (corpus.py), so it
holds the tail of one document, then whole ones, then the head of another. With
`config.data.document_mask` the model attends inside each document only (gpt2_jax/model/attention.py).

The rule: a document begins AT its `<|endoftext|>`. The EOT token gets position 0 and the new
segment id, and predicts the document's first token from itself alone, as a document prompted with
`<|endoftext|>` is generated; the token before it, the last of the previous document, predicts the
EOT from that document's context (learning where a document ends). Tokens before the window's first
EOT (a document cut by the window's start) are segment 0 with positions 0, 1, ... from the window's
start: their true positions are unknown.

Computed from the tokens inside the jitted step (a cumulative sum and maximum over T), so the data
pipeline, its batches and its resumable state stay as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gpt2_jax.data.tokenizer import EOT_ID


def document_layout(tokens: jax.Array, eot_id: int = EOT_ID) -> tuple[jax.Array, jax.Array]:
    """tokens int [B, T] -> (positions, segment_ids), both int32 [B, T]: the index of each token in its
    document, and the number of EOT tokens at or before it in the row."""
    is_start = tokens == eot_id  # [B, T]
    segment_ids = jnp.cumsum(is_start, axis=1, dtype=jnp.int32)
    index = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    start = jax.lax.cummax(jnp.where(is_start, index, 0), axis=1)  # index of the document's first token
    return index - start, segment_ids
