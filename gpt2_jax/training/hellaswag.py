"""config.train.hellaswag: HellaSwag accuracy at each eval of the training loop.

The examples are read and tokenised once, at start-up. Each eval scores them with
gpt2_jax/model/scoring.py's score_choices, the rule `python -m gpt2_jax.evaluate --hellaswag`
applies, so the two report the same accuracies for the same weights. Only the way rows reach the
devices differs: here they run on the training mesh, split over its batch axes (data x fsdp) like a
training batch, with the parameters sharded as they train, so every device scores a part and no
copy of the model is gathered. Rows are grouped by length (16, 32, 64, ... tokens, so a short row
is not padded to the longest; one compiled program per length) and a step holds as many tokens as
an eval batch (step.eval_batch_size rows of block_size), since that is what the run was sized for.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from gpt2_jax.data.hellaswag import load_hellaswag
from gpt2_jax.model.scoring import Rows, choice_rows, row_length, row_losses, score_choices
from gpt2_jax.training import sharding
from gpt2_jax.training import step as step_lib
from gpt2_jax.training.run import Run


class HellaSwagEval:
    """`evaluate(params) -> {"hellaswag_acc", "hellaswag_acc_norm"}` on the run's mesh."""

    def __init__(self, run: Run, path: str, limit: int):
        from gpt2_jax.data.tokenizer import get_tokenizer

        config = run.model_config
        if config.vocab_size < get_tokenizer().n_vocab:
            raise ValueError(f"config.train.hellaswag needs GPT-2's {get_tokenizer().n_vocab}-token vocabulary; "
                             f"config.model.vocab_size is {config.vocab_size}")
        self.examples = load_hellaswag(path, limit)
        self.block_size = config.block_size
        choice_rows(self.examples, self.block_size)  # refuses bad examples now, not at the first eval
        self.eval_batch = step_lib.eval_batch_size(run.train_cfg)
        self.mesh = run.mesh
        self.rows_sharding = sharding.batch_sharding(run.mesh)  # [R, T]: R over data x fsdp
        self.fn = jax.jit(
            functools.partial(row_losses, config),
            in_shardings=(run.state_shardings.params,) + (self.rows_sharding,) * 4,
            out_shardings=sharding.replicated(run.mesh),  # [R] on every process
        )

    def rows_per_step(self, length: int) -> int:
        """Rows of `length` tokens a step takes: as many tokens as an eval batch (a multiple of data x fsdp,
        as the eval batch is)."""
        return self.eval_batch * max(1, self.block_size // length)

    def _score_rows(self, params: Any, rows: Rows) -> np.ndarray:
        """Rows grouped by padded length (row_length of each row's own length), each group cut to it:
        short rows cost no padding up to the longest row, and a step holds more of them."""
        own = rows.positions.shape[1] - np.sum(rows.positions < 0, axis=1)  # [R] tokens of each row
        group = np.array([row_length(max(int(n), 1), self.block_size) for n in own])
        out = np.zeros(len(own), np.float64)
        for length in sorted(set(group.tolist())):
            which = np.flatnonzero(group == length)
            part = Rows(*(a[which, :length] for a in rows))
            out[which] = self._score_group(params, part, self.rows_per_step(length))
        return out

    def _score_group(self, params: Any, rows: Rows, n: int) -> np.ndarray:
        R = rows.inputs.shape[0]
        arrays = [np.pad(a, ((0, -R % n), (0, 0))) for a in rows]  # padding rows weigh 0
        out = []
        for start in range(0, arrays[0].shape[0], n):
            # Every process holds all rows; each device takes its own part of the batch.
            batch = [jax.make_array_from_callback((n, a.shape[1]), self.rows_sharding,
                                                  lambda index, part=a[start : start + n]: part[index])
                     for a in arrays]
            with sharding.sharding_context(self.mesh):
                out.append(np.asarray(self.fn(params, *batch), np.float64))
        return np.concatenate(out)[:R]

    def __call__(self, params: Any) -> dict[str, float]:
        scores = score_choices(self.examples, self.block_size, functools.partial(self._score_rows, params))
        return {"hellaswag_acc": scores.accuracy, "hellaswag_acc_norm": scores.accuracy_norm}
