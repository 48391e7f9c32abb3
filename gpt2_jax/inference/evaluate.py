"""Evaluation: perplexity of a text (strided sliding window) and multiple-choice accuracy (HellaSwag).

    python -m gpt2_jax.evaluate --hf path/to/gpt2 --text wiki.txt [--stride 512] [--json]
    python -m gpt2_jax.evaluate --ckpt WORKDIR --hellaswag hellaswag_val.jsonl [--limit 1000]

(the command line is evaluate_cli.py)

Both score padded rows of tokens with one compiled function, the summed next-token loss over the
positions a weight selects. Rows are split over every device (a 1-D mesh whose one axis splits
the batch; parameters replicated).

Perplexity follows Hugging Face's perplexity guide: windows of `block_size` tokens start every
`stride` tokens; each window scores only the tokens the previous window did not reach, so every
token after the first is scored exactly once, with at least block_size - stride tokens of context
(the first window's tokens: everything before them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import GPT2
from gpt2_jax.model.loss import chunked_token_losses, resolve_loss_chunk

BATCH_AXIS = "batch"


# ----------------------------------------------------------------------------- scoring rows


def _row_losses(config: ModelConfig, params, inputs, positions, targets, weights) -> jax.Array:
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


@functools.lru_cache(maxsize=8)
def _sharded_row_losses(config: ModelConfig):
    """(jitted _row_losses, replicated sharding, row sharding) on a 1-D mesh over all devices."""
    mesh = Mesh(np.array(jax.devices()), (BATCH_AXIS,))
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    fn = jax.jit(
        functools.partial(_row_losses, config),
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

    def __call__(self, inputs, positions, targets, weights) -> np.ndarray:
        """Arrays [R, T] -> [R] float64 summed weighted losses."""
        R = inputs.shape[0]
        n = self.rows_per_step
        pad = -R % n  # padding rows carry zero weight
        arrays = [np.pad(a, ((0, pad), (0, 0))) for a in (inputs, positions, targets, weights)]
        out = []
        for start in range(0, R + pad, n):
            batch = [jax.device_put(a[start : start + n], self.rows) for a in arrays]
            out.append(np.asarray(self.fn(self.params, *batch), np.float64))
        return np.concatenate(out)[:R]


def _pack(rows: list[tuple[list[int], list[int], list[float]]], length: int):
    """(inputs, targets, weights) lists -> right-padded arrays [R, length]; positions -1 on padding."""
    R = len(rows)
    inputs = np.zeros((R, length), np.int32)
    targets = np.zeros((R, length), np.int32)
    weights = np.zeros((R, length), np.float32)
    positions = np.full((R, length), -1, np.int32)
    for r, (x, y, w) in enumerate(rows):
        inputs[r, : len(x)], targets[r, : len(y)], weights[r, : len(w)] = x, y, w
        positions[r, : len(x)] = np.arange(len(x))
    return inputs, positions, targets, weights


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
    total = _Scorer(config, params, batch_size)(*_pack(rows, length)).sum()
    return float(math.exp(total / (tokens.size - 1)))


# ----------------------------------------------------------------------------- multiple choice


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """A context, candidate endings (token ids) and the index of the right ending."""

    context: list[int]
    endings: list[list[int]]
    label: int


def _bucket(n: int, cap: int) -> int:
    return min(cap, max(16, 1 << (n - 1).bit_length()))


def score_multiple_choice(
    config: ModelConfig, params, examples: Sequence[MultipleChoice], *, batch_size: int = 8
) -> tuple[float, list[int]]:
    """(accuracy, predicted ending per example). An ending's score is the mean loss of its tokens
    given the context; the lowest wins. Contexts too long for block_size lose their oldest tokens."""
    if not examples:
        raise ValueError("no examples to score")
    rows, owners = [], []
    for i, ex in enumerate(examples):
        if not ex.context or not ex.endings or not all(ex.endings):
            raise ValueError(f"example {i} needs a non-empty context and non-empty endings")
        if not 0 <= ex.label < len(ex.endings):
            raise ValueError(f"example {i}: label={ex.label} is not an index into its {len(ex.endings)} endings")
        for ending in ex.endings:
            if len(ending) >= config.block_size:
                raise ValueError(
                    f"example {i} has an ending of {len(ending)} tokens; block_size is {config.block_size}"
                )
            seq = (list(ex.context) + list(ending))[-config.block_size :]
            n = len(ending)
            rows.append((seq[:-1], seq[1:], [0.0] * (len(seq) - 1 - n) + [1.0 / n] * n))  # weights average
            owners.append(i)
    length = _bucket(max(len(x) for x, _, _ in rows), config.block_size)
    mean_loss = _Scorer(config, params, batch_size)(*_pack(rows, length))
    predictions, r = [], 0
    for ex in examples:
        scores = mean_loss[r : r + len(ex.endings)]
        predictions.append(int(np.argmin(scores)))
        r += len(ex.endings)
    correct = sum(p == ex.label for p, ex in zip(predictions, examples))
    return correct / len(examples), predictions


def load_hellaswag(path: str, limit: int = 0) -> list[MultipleChoice]:
    """HellaSwag jsonl (`ctx`, `endings`, `label` per line), tokenised with GPT-2's BPE.

    Endings are encoded with a leading space, as they continue the context's last word.
    """
    from gpt2_jax.data.tokenizer import get_tokenizer

    enc = get_tokenizer()
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                ctx, endings, label = d["ctx"], d["endings"], int(d["label"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a HellaSwag record with ctx, endings, label ({e})") from None
            examples.append(
                MultipleChoice(enc.encode(ctx), [enc.encode(" " + e) for e in endings], label)
            )
            if limit and len(examples) >= limit:
                break
    return examples
