"""How a model scores given text: summed next-token losses of padded rows, and the multiple-choice rule.

`row_losses` is the pure device function (jit it with the shardings of your mesh). `score_choices`
is the one multiple-choice rule (HellaSwag): `python -m gpt2_jax.evaluate --hellaswag`
(inference/evaluate.py) and the training loop's in-loop HellaSwag (training/hellaswag.py) both
call it, each with its own way of running rows on its devices, so both report the same accuracy.

The rule: each ending follows its context in a row of its own (contexts too long for block_size
lose their oldest tokens); an ending's loss is the summed next-token loss of its tokens.
  accuracy       the ending with the lowest summed loss (the most likely one) wins
  accuracy_norm  the ending with the lowest mean loss per token wins (llm.c's acc_norm: long
                 endings are not penalised for their length)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.data.hellaswag import MultipleChoice
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import GPT2
from gpt2_jax.model.loss import chunked_token_losses, resolve_loss_chunk


class Rows(NamedTuple):
    """Right-padded rows of tokens to score."""

    inputs: np.ndarray  # int32 [R, T]
    positions: np.ndarray  # int32 [R, T], -1 on padding
    targets: np.ndarray  # int32 [R, T]
    weights: np.ndarray  # float32 [R, T], what each target's loss counts for; 0 on padding


# Rows -> [R] float64 summed weighted losses, computed however the caller runs the model.
RowScorer = Callable[[Rows], np.ndarray]


def pack_rows(rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[float]]], length: int) -> Rows:
    """(inputs, targets, weights) lists -> Rows [R, length]."""
    R = len(rows)
    inputs = np.zeros((R, length), np.int32)
    targets = np.zeros((R, length), np.int32)
    weights = np.zeros((R, length), np.float32)
    positions = np.full((R, length), -1, np.int32)
    for r, (x, y, w) in enumerate(rows):
        inputs[r, : len(x)], targets[r, : len(y)], weights[r, : len(w)] = x, y, w
        positions[r, : len(x)] = np.arange(len(x))
    return Rows(inputs, positions, targets, weights)


def row_losses(config: ModelConfig, params, inputs, positions, targets, weights) -> jax.Array:
    """[B, T] int inputs / positions (-1 = padding) / targets, float weights -> [B] summed loss.

    The head runs a chunk of positions at a time when `config.loss_chunk` resolves to one
    (gpt2_jax/model/loss.py); the losses are the same."""
    chunk = resolve_loss_chunk(config)
    if chunk:
        nll = chunked_token_losses(config, params, inputs, targets, positions, chunk=chunk)  # [B, T]
        return jnp.sum(nll * weights, axis=-1)
    logits = GPT2(config).apply({"params": params}, inputs, positions).astype(jnp.float32)  # [B, T, V]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit  # [B, T], no [B, T, V] log-softmax kept
    return jnp.sum(nll * weights, axis=-1)


# ----------------------------------------------------------------------------- multiple choice


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    accuracy: float  # lowest summed loss of the ending wins
    accuracy_norm: float  # lowest mean loss per ending token wins
    predictions: list[int]  # the winning ending of each example, by summed loss
    predictions_norm: list[int]  # ... by mean loss per token


def row_length(n: int, block_size: int) -> int:
    """The padded length of rows whose longest is n: a power of two from 16, at most block_size
    (few distinct lengths, so few compiled programs)."""
    return min(block_size, max(16, 1 << (n - 1).bit_length()))


def choice_rows(examples: Sequence[MultipleChoice], block_size: int) -> Rows:
    """One row per (example, ending), in order; each ending token's target weighs 1."""
    if not examples:
        raise ValueError("no examples to score")
    rows = []
    for i, ex in enumerate(examples):
        if not ex.context or not ex.endings or not all(ex.endings):
            raise ValueError(f"example {i} needs a non-empty context and non-empty endings")
        if not 0 <= ex.label < len(ex.endings):
            raise ValueError(f"example {i}: label={ex.label} is not an index into its {len(ex.endings)} endings")
        for ending in ex.endings:
            if len(ending) >= block_size:
                raise ValueError(f"example {i} has an ending of {len(ending)} tokens; block_size is {block_size}")
            seq = (list(ex.context) + list(ending))[-block_size:]
            n = len(ending)
            rows.append((seq[:-1], seq[1:], [0.0] * (len(seq) - 1 - n) + [1.0] * n))
    return pack_rows(rows, row_length(max(len(x) for x, _, _ in rows), block_size))


def score_choices(examples: Sequence[MultipleChoice], block_size: int, score_rows: RowScorer) -> ChoiceScores:
    """The multiple-choice rule (module docstring); `score_rows` runs the model on choice_rows."""
    summed = np.asarray(score_rows(choice_rows(examples, block_size)), np.float64)  # [R]
    predictions, predictions_norm, r = [], [], 0
    for ex in examples:
        losses = summed[r : r + len(ex.endings)]
        predictions.append(int(np.argmin(losses)))
        predictions_norm.append(int(np.argmin(losses / np.array([len(e) for e in ex.endings]))))
        r += len(ex.endings)
    labels = [ex.label for ex in examples]
    return ChoiceScores(
        accuracy=float(np.mean(np.equal(predictions, labels))),
        accuracy_norm=float(np.mean(np.equal(predictions_norm, labels))),
        predictions=predictions,
        predictions_norm=predictions_norm,
    )
