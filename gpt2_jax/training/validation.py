"""The loop's evaluation: validation loss and bits per byte, and HellaSwag where it is asked for.

`make_evaluator(run, val_tokens, t)` gives `evaluate(params) -> scores`, or None when
config.train.eval_every or eval_steps is 0. Every evaluation reads the same windows of the
validation split, so its losses compare across a run and across resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from gpt2_jax import data as data_lib
from gpt2_jax.data import token_bytes
from gpt2_jax.training import distributed
from gpt2_jax.training import hellaswag as hellaswag_lib
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import step as step_lib


def make_evaluator(run: run_lib.Run, val_tokens: Any, t: Any) -> Callable[[Any], dict[str, float]] | None:
    """params -> {val_loss: the mean loss over eval_steps global batches, val_bpb (data/token_bytes.py),
    and the HellaSwag accuracies where config.train.hellaswag is set}, or None when evaluation is off."""
    if not (t.eval_every > 0 and t.eval_steps > 0):
        return None
    eval_step, eval_batch = step_lib.make_eval_step(run), step_lib.eval_batch_size(t)
    hellaswag = hellaswag_lib.HellaSwagEval(run, t.hellaswag, t.hellaswag_examples) if t.hellaswag else None
    val_bytes: list[int] = []  # the bytes the scored targets decode to: counted once (every eval reads the same)

    def evaluate(params) -> dict[str, float]:
        it = data_lib.make_batch_iterator(
            val_tokens, block_size=run.model_config.block_size, global_batch_size=eval_batch,
            seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count(),
            name="validation split",
        )
        steps = min(t.eval_steps * t.grad_accum_steps, it.steps_per_epoch)  # eval_steps global batches
        total, local_bytes = 0.0, 0
        for _ in range(steps):
            local = next(it)
            if not val_bytes:
                local_bytes += token_bytes.count_bytes(local["targets"])
            total += float(eval_step(params, run.global_batch(local, eval_batch))["loss"])
        it.close()
        if not val_bytes:
            val_bytes.append(distributed.sum_over_processes(local_bytes))
        val_loss = total / steps
        scores = {"val_loss": val_loss, "val_bpb": token_bytes.bits_per_byte(
            val_loss, steps * eval_batch * run.model_config.block_size, val_bytes[0])}
        if hellaswag is not None:
            scores.update(hellaswag(params))
        return scores

    return evaluate
