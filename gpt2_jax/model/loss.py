"""The next-token loss computed from the last residual stream a chunk of positions at a time.

GPT-2's head turns every token into vocab_size logits: at T = 1024 and 16 sequences per chip the
fp32 logits [B, T, V] are 3.3 GB, and their gradient as much again, while the whole block stack
holds a few hundred MB of activations. `chunked_token_losses` never forms them: positions go
`chunk` at a time through one `lax.scan` step each (the head matmul, the soft-cap, the log-sum-exp
over the vocabulary and the target's logit), and the step is rematerialised (`jax.checkpoint`),
so the forward keeps only each token's loss and the backward recomputes one chunk's logits
[B, chunk, V] at a time. The head's weight gradient is summed over the chunks in the carry of the
scan's transpose.

Why chunks of positions and not of the vocabulary: each chunk's softmax then runs over the whole
vocabulary in one pass, as the unchunked loss does (no running maximum rescaled across vocabulary
chunks), the padded vocabulary columns are masked where they lie, and under a mesh nothing moves:
the batch axis stays split over data x fsdp and the vocabulary over tensor inside every chunk,
exactly as the whole logits are split. Cutting the vocabulary instead would cut the axis tensor
parallelism already splits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gpt2_jax.model import platform
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import GPT2Hidden, head_grads

# Positions per chunk where 'auto' chunks (TPU, GPU): logits [B, 128, V] per chunk, 0.4 GB in fp32
# at 16 sequences of GPT-2's vocabulary per chip, against 3.3 GB whole; each chunk's head matmul is
# still 2048 x 768 x 50304, large enough to keep a TPU's matrix units busy.
ACCELERATOR_CHUNK = 128
# On a CPU memory is not the limit and the whole-logits loss measured faster (BENCHMARKS.md,
# "Chunked cross-entropy on CPU"), so 'auto' keeps it there.
CPU_CHUNK = 0


def resolve_loss_chunk(config: ModelConfig, backend: str | None = None) -> int:
    """Positions per chunk for `config.loss_chunk` on `backend` (default: the mesh's platform,
    gpt2_jax/model/platform.py); 0 means the whole logits at once."""
    if config.loss_chunk != "auto":
        return config.loss_chunk
    backend = backend or platform.current()
    return CPU_CHUNK if backend == "cpu" else ACCELERATOR_CHUNK


@jax.custom_vjp
def _stored_head_matmul(h: jax.Array, table: jax.Array) -> jax.Array:
    """h [..., E] (compute dtype) . table [V, E]^T -> fp32 [..., V], the table cast to h's dtype:
    gpt2.head_matmul, but the table's gradient comes back in its stored dtype unrounded. The scan
    sums it over the chunks; through head_matmul each chunk's share would first be rounded to the
    compute dtype (bf16), once per chunk, where the whole-logits loss rounds the total once."""
    return jnp.einsum("...e,ve->...v", h, table.astype(h.dtype), preferred_element_type=jnp.float32)


def _stored_head_fwd(h, table):
    return _stored_head_matmul(h, table), (h, table)


def _stored_head_bwd(residuals, g):
    h, table = residuals
    dh, dtable = head_grads(h, table.astype(h.dtype), g)
    return dh.astype(h.dtype), dtable.astype(table.dtype)


_stored_head_matmul.defvjp(_stored_head_fwd, _stored_head_bwd)


def head_token_losses(config: ModelConfig, h: jax.Array, table: jax.Array, targets: jax.Array,
                      chunk: int) -> jax.Array:
    """Per-token next-token losses, fp32 [B, T], from h [B, T, E] (final-normed, compute dtype), the
    head table [V_padded, E] as stored and targets int [B, T]: `chunk` positions at a time.

    A last chunk that T does not fill is padded; its padded tokens' losses are dropped, so they
    add nothing to the loss or to any gradient.
    """
    B, T, E = h.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    h_chunks = h.reshape(B, n, chunk, E).swapaxes(0, 1)  # [n, B, C, E]
    target_chunks = targets.reshape(B, n, chunk).swapaxes(0, 1)  # [n, B, C]
    real_columns = jnp.arange(table.shape[0]) < config.vocab_size  # [V_padded]

    # prevent_cse=False: inside a scan there is nothing for XLA to merge the recomputation with.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_losses(h_c, t_c):  # [B, C, E], [B, C] -> [B, C]
        logits = _stored_head_matmul(h_c, table)  # [B, C, V_padded] fp32
        if config.logit_softcap > 0:
            logits = config.logit_softcap * jnp.tanh(logits / config.logit_softcap)
        # Padded columns are excluded as the whole-logits loss cuts them: exp(-inf) adds nothing to
        # the sum and takes no gradient. Masking in place keeps the vocabulary axis whole, where a
        # slice to vocab_size would reshard it under tensor parallelism.
        logits = jnp.where(real_columns, logits, -jnp.inf)
        log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
        target_logit = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]  # [B, C]
        return log_z - target_logit

    _, losses = jax.lax.scan(lambda carry, xs: (carry, chunk_losses(*xs)), None, (h_chunks, target_chunks))
    return losses.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]  # [B, T]


def chunked_token_losses(config: ModelConfig, params, tokens: jax.Array, targets: jax.Array,
                         positions: jax.Array | None = None, *, chunk: int,
                         dropout_rng: jax.Array | None = None) -> jax.Array:
    """GPT2's per-token next-token losses fp32 [B, T] for tokens and targets int [B, T], with the
    head run `chunk` positions at a time. dropout_rng=None runs deterministically."""
    h, table = GPT2Hidden(config).apply(
        {"params": params},
        tokens,
        positions,
        deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
    )  # [B, T, E], [V_padded, E]
    return head_token_losses(config, h, table, targets, chunk)
