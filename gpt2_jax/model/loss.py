"""The next-token loss computed from the last residual stream a chunk of positions at a time.

GPT-2's head turns every token into vocab_size logits: at T = 1024 and 16 sequences per chip the
fp32 logits [B, T, V] are 3.3 GB, and their gradient as much again, while the whole block stack
holds a few hundred MB of activations. Here positions go `chunk` at a time through one `lax.scan`
step each (the head matmul, the soft-cap, the log-sum-exp over the vocabulary, the target's
logit), so no more than one chunk's logits [B, chunk, V] exist at once, forward or backward.

Training differentiates `head_mean_loss`, the mean over all tokens, whose custom VJP computes the
gradients in the same scan step as the loss: a mean's cotangent is known up to one scalar factor
before the backward pass starts (d mean / d logits = (softmax - one_hot(target)) / (B T)), so each
step also runs the two backward matmuls of its chunk (dh [B, chunk, E] and its share of the head's
weight gradient, summed over the chunks in fp32), and the backward pass only scales them by the
incoming cotangent. A `jax.checkpoint`ed step would instead run the head's forward matmul a second
time in the backward pass: a third more head FLOPs, and the head is most of a small model's. What
the forward pass keeps for the backward instead of the logits: dh [B, T, E] in the compute dtype
(the size of h itself) and the head's weight gradient [V_padded, E] in the table's stored dtype
(GPT-2 small: 155 MB in fp32, before any sharding of it).
Evaluation calls `head_token_losses` (forward only, one loss per token for the weighted sums).

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
# still 2048 x 768 x 50304, large enough to keep a TPU's matrix units busy. Compiled for v5e 2x2
# (configs/gpt2_124m.py's model, bf16, fsdp=4, 16 x 1024 tokens per chip), the step's temporaries
# were 18.2 GiB whole and 9.9 / 10.1 / 11.5 / 13.9 GiB at 64 / 128 / 256 / 512 positions: below
# 128 the memory barely falls, and the matmuls shrink.
ACCELERATOR_CHUNK = 128
# On a CPU memory is not the limit, but the chunked step measured as fast as the whole-logits one
# where T <= 128 (one chunk) and 5-6% faster with 2 and 8 chunks of 128 (BENCHMARKS.md, "Chunked
# cross-entropy on CPU"); 32 and 64 positions were slower than the whole logits (smaller GEMMs).
CPU_CHUNK = 128


def loss_choice(config: ModelConfig, backend: str | None = None) -> tuple[int, str]:
    """(positions per chunk, why) for `config.loss_chunk` on `backend` (default: the mesh's platform,
    gpt2_jax/model/platform.py); 0 positions means the whole logits at once."""
    if config.loss_chunk != "auto":
        return config.loss_chunk, "as configured"
    backend = backend or platform.current()
    return (CPU_CHUNK if backend == "cpu" else ACCELERATOR_CHUNK), f"auto: {backend.upper()}"


def resolve_loss_chunk(config: ModelConfig, backend: str | None = None) -> int:
    """Positions per chunk (0: whole logits), as `loss_choice` decides."""
    return loss_choice(config, backend)[0]


def describe(chunk: int) -> str:
    """What a resolved chunk means, for the line train.py prints."""
    return f"chunks of up to {chunk} positions" if chunk else "whole logits"


# --------------------------------------------------------------------------- one chunk
def _split(h: jax.Array, targets: jax.Array, chunk: int):
    """h [B, T, E], targets [B, T] -> chunks h [n, B, C, E], targets [n, B, C], real [n, B, C] (False
    where a last chunk that T does not fill is padded)."""
    B, T, E = h.shape
    chunk = min(chunk, T)  # a chunk longer than the rows would only be padding
    n = -(-T // chunk)
    pad = n * chunk - T
    real = jnp.arange(n * chunk) < T  # [n C]
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    real = jnp.broadcast_to(real.reshape(n, 1, chunk), (n, B, chunk))
    return h.reshape(B, n, chunk, E).swapaxes(0, 1), targets.reshape(B, n, chunk).swapaxes(0, 1), real


def _unsplit(x: jax.Array, T: int) -> jax.Array:
    """[n, B, C, ...] -> [B, T, ...] (the padding of a last short chunk dropped)."""
    n, B, C = x.shape[:3]
    return x.swapaxes(0, 1).reshape((B, n * C) + x.shape[3:])[:, :T]


def _chunk_forward(config: ModelConfig, h_c: jax.Array, table: jax.Array, t_c: jax.Array):
    """One chunk: (raw logits fp32 [B, C, V_padded], logits as the loss sees them, log-sum-exp [B, C],
    losses [B, C]). The head matmul is gpt2.head_matmul's: operands in the compute dtype, fp32 out."""
    raw = jnp.einsum("bce,ve->bcv", h_c, table, preferred_element_type=jnp.float32)  # [B, C, V_padded]
    logits = raw
    if config.logit_softcap > 0:
        logits = config.logit_softcap * jnp.tanh(raw / config.logit_softcap)
    # Padded columns are excluded as the whole-logits loss cuts them: exp(-inf) adds nothing to the
    # sum and gets no gradient. Masking in place keeps the vocabulary axis whole, where a slice to
    # vocab_size would reshard it under tensor parallelism.
    logits = jnp.where(jnp.arange(table.shape[0]) < config.vocab_size, logits, -jnp.inf)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
    target_logit = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]  # [B, C]
    return raw, logits, log_z, log_z - target_logit


# --------------------------------------------------------------------------- losses
def head_token_losses(config: ModelConfig, h: jax.Array, table: jax.Array, targets: jax.Array,
                      chunk: int) -> jax.Array:
    """Per-token next-token losses fp32 [B, T] from h [B, T, E] (final-normed, compute dtype), the
    head table [V_padded, E] as stored and targets int [B, T], `chunk` positions at a time. For
    evaluation: training differentiates `head_mean_loss`."""
    h_chunks, target_chunks, _ = _split(h, targets, chunk)
    w = table.astype(h.dtype)  # [V_padded, E]
    step = lambda carry, xs: (carry, _chunk_forward(config, xs[0], w, xs[1])[3])  # noqa: E731
    _, losses = jax.lax.scan(step, None, (h_chunks, target_chunks))  # [n, B, C]
    return _unsplit(losses, h.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def head_mean_loss(config: ModelConfig, h: jax.Array, table: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """Mean next-token loss fp32 over all B x T tokens (as `head_token_losses(...).mean()`), with the
    gradients computed in the forward scan (the module docstring says why)."""
    return jnp.mean(head_token_losses(config, h, table, targets, chunk))


def _mean_loss_fwd(config, h, table, targets, chunk):
    B, T, _ = h.shape
    h_chunks, target_chunks, real = _split(h, targets, chunk)
    w = table.astype(h.dtype)  # [V_padded, E], compute dtype
    vocab = jnp.arange(table.shape[0])

    def step(dtable, xs):
        h_c, t_c, real_c = xs  # [B, C, E], [B, C], [B, C]
        raw, logits, log_z, losses = _chunk_forward(config, h_c, w, t_c)
        # d mean / d logits for a cotangent of 1: (softmax - one_hot(target)) / (B T) on real tokens;
        # exp(-inf - log_z) = 0 on padded columns.
        scale = jnp.where(real_c, 1.0 / (B * T), 0.0)[..., None]  # [B, C, 1]
        g = (jnp.exp(logits - log_z[..., None]) - (vocab == t_c[..., None])) * scale  # [B, C, V_padded]
        if config.logit_softcap > 0:  # d/dx c tanh(x / c) = 1 - tanh(x / c)^2
            g = g * (1.0 - jnp.square(jnp.tanh(raw / config.logit_softcap)))
        dh, dtable_c = head_grads(h_c, w, g)  # fp32 [B, C, E], [V_padded, E]
        return dtable + dtable_c, (jnp.where(real_c, losses, 0.0), dh.astype(h.dtype))

    # The table's gradient is summed over the chunks in fp32 and rounded once, to the stored dtype
    # (the whole-logits head_matmul rounds it to the compute dtype: bf16 in mixed precision).
    dtable, (losses, dh) = jax.lax.scan(step, jnp.zeros(table.shape, jnp.float32),
                                        (h_chunks, target_chunks, real))
    return jnp.sum(losses) / (B * T), (_unsplit(dh, T), dtable.astype(table.dtype))


def _mean_loss_bwd(config, chunk, residuals, g):
    del config, chunk
    dh, dtable = residuals
    # g is 1 under value_and_grad of the loss itself, and these products are then exact.
    return dh * g.astype(dh.dtype), dtable * g.astype(dtable.dtype), None  # targets: integers, no gradient


head_mean_loss.defvjp(_mean_loss_fwd, _mean_loss_bwd)


# --------------------------------------------------------------------------- from tokens
def _hidden(config: ModelConfig, params, tokens, positions, dropout_rng, segment_ids=None):
    return GPT2Hidden(config).apply(
        {"params": params},
        tokens,
        positions,
        segment_ids=segment_ids,
        deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
    )  # h [B, T, E], table [V_padded, E]


def chunked_mean_loss(config: ModelConfig, params, tokens: jax.Array, targets: jax.Array, *, chunk: int,
                      dropout_rng: jax.Array | None = None, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
    """GPT2's mean next-token loss (fp32 scalar) for tokens and targets int [B, T], the head run
    `chunk` positions at a time. dropout_rng=None runs deterministically; positions and segment_ids
    as GPT2 takes them (packed documents)."""
    h, table = _hidden(config, params, tokens, positions, dropout_rng, segment_ids)
    return head_mean_loss(config, h, table, targets, chunk)


def chunked_token_losses(config: ModelConfig, params, tokens: jax.Array, targets: jax.Array,
                         positions: jax.Array | None = None, *, chunk: int) -> jax.Array:
    """GPT2's per-token next-token losses fp32 [B, T] (deterministic, for evaluation), the head run
    `chunk` positions at a time."""
    h, table = _hidden(config, params, tokens, positions, None)
    return head_token_losses(config, h, table, targets, chunk)
