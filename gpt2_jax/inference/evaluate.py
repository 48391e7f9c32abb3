"""Evaluation: perplexity of a text (strided sliding window) and multiple-choice accuracy (HellaSwag).

    python -m gpt2_jax.evaluate --hf path/to/gpt2 --text wiki.txt [--stride 512] [--json]
    python -m gpt2_jax.evaluate --ckpt WORKDIR --hellaswag hellaswag_val.jsonl [--limit 1000]

(the command line is evaluate_cli.py)

Both score padded rows of tokens with one compiled function (gpt2_jax/model/scoring.py's
row_losses), the summed next-token loss over the positions a weight selects. Rows are split over
every device (a 1-D mesh whose one axis splits the batch; parameters replicated). The
multiple-choice rule is scoring.py's score_choices, which the training loop's HellaSwag runs too.

Perplexity follows Hugging Face's perplexity guide: windows of `block_size` tokens start every
`stride` tokens; each window scores only the tokens the previous window did not reach, so every
token after the first is scored exactly once, with at least block_size - stride tokens of context
(the first window's tokens: everything before them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2_jax.data.hellaswag import MultipleChoice, load_hellaswag
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.scoring import ChoiceScores, Rows, pack_rows, row_losses, score_choices

__all__ = ["ChoiceScores", "MultipleChoice", "load_hellaswag", "perplexity", "score_multiple_choice",
           "sliding_windows"]

BATCH_AXIS = "batch"


# ----------------------------------------------------------------------------- scoring rows


@functools.lru_cache(maxsize=8)
def _sharded_row_losses(config: ModelConfig):
    """(jitted row_losses, replicated sharding, row sharding) on a 1-D mesh over all devices."""
    mesh = Mesh(np.array(jax.devices()), (BATCH_AXIS,))
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    fn = jax.jit(
        functools.partial(row_losses, config),
        in_shardings=(replicated, rows, rows, rows, rows),
        out_shardings=rows,
    )
    return fn, replicated, rows


class _Scorer:
    """Summed next-token losses of many rows, `batch_size` rows per step split over all devices."""

    def __init__(self, config: ModelConfig, params, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.fn, replicated, self.rows = _sharded_row_losses(config)
        n_devices = len(jax.devices())
        self.rows_per_step = -(-batch_size // n_devices) * n_devices  # a multiple of the devices
        self.params = jax.device_put(params, replicated)

    def __call__(self, rows: Rows) -> np.ndarray:
        """Rows [R, T] -> [R] float64 summed weighted losses."""
        R = rows.inputs.shape[0]
        n = self.rows_per_step
        pad = -R % n  # padding rows carry zero weight
        arrays = [np.pad(a, ((0, pad), (0, 0))) for a in rows]
        out = []
        for start in range(0, R + pad, n):
            batch = [jax.device_put(a[start : start + n], self.rows) for a in arrays]
            out.append(np.asarray(self.fn(self.params, *batch), np.float64))
        return np.concatenate(out)[:R]


# ----------------------------------------------------------------------------- perplexity


@dataclasses.dataclass(frozen=True)
class Window:
    """Tokens [start, end) are the window; it scores the predictions of tokens [first_target, end)."""

    start: int
    end: int
    first_target: int


def sliding_windows(num_tokens: int, context: int, stride: int) -> list[Window]:
    """Hugging Face's perplexity-guide windows: one every `stride` tokens, each `context` long."""
    if not 1 <= stride < context:
        raise ValueError(
            f"stride={stride} must be in [1, {context - 1}] (below the context of {context} tokens, "
            "so that consecutive windows overlap and every token is scored)"
        )
    windows, start, prev_end = [], 0, 0
    while True:
        end = min(start + context, num_tokens)
        windows.append(Window(start, end, max(prev_end, start + 1)))
        if end == num_tokens:
            return windows
        start, prev_end = start + stride, end


def perplexity(
    config: ModelConfig, params, tokens: Sequence[int], *, stride: int | None = None, batch_size: int = 8
) -> float:
    """exp(mean next-token loss) of `tokens` (every token after the first is predicted once).

    Windows of block_size tokens; `stride` defaults to block_size // 2.
    """
    tokens = np.asarray(tokens, np.int64).reshape(-1)
    if tokens.size < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {tokens.size}")
    context = config.block_size
    stride = max(1, context // 2) if stride is None else stride
    windows = sliding_windows(tokens.size, context, stride)
    rows = []
    for w in windows:
        x = tokens[w.start : w.end - 1]
        y = tokens[w.start + 1 : w.end]
        scored = np.arange(w.start + 1, w.end) >= w.first_target  # y[i] is token w.start + 1 + i
        rows.append((x, y, scored.astype(np.float32)))
    length = max(len(x) for x, _, _ in rows)
    total = _Scorer(config, params, batch_size)(pack_rows(rows, length)).sum()
    return float(math.exp(total / (tokens.size - 1)))


# ----------------------------------------------------------------------------- multiple choice


def score_multiple_choice(
    config: ModelConfig, params, examples: Sequence[MultipleChoice], *, batch_size: int = 8
) -> ChoiceScores:
    """Accuracy (lowest summed loss of an ending wins) and normalised accuracy (lowest mean loss per
    token wins), with each example's predictions: gpt2_jax/model/scoring.py's rule, which the
    training loop's HellaSwag applies too."""
    return score_choices(examples, config.block_size, _Scorer(config, params, batch_size))
