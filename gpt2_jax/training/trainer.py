"""The training loop: data, sharded state, steps, eval, logging, checkpoints, signals.

`train(config, workdir)` is all that train.py calls. Everything here runs the same on one CPU,
on the 8 devices of one host and on every host of a pod (each process runs this same code).
What a run reports (records, throughput, plots, the last line) is metrics.py's; its evaluation is
validation.py's. The loop itself is a few `every(step, n)` blocks: log, evaluate, stop on a signal,
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax

from gpt2_jax import data as data_lib
from gpt2_jax import storage
from gpt2_jax.model.config import count_params
from gpt2_jax.training import checkpoint as ckpt_lib
from gpt2_jax.training import distributed, metrics, metrics_file, profiling, validation, wandb_log, workdir_lock
from gpt2_jax.training import init_from as init_from_lib
from gpt2_jax.training import resume as resume_lib
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import sharding as sharding_lib
from gpt2_jax.training import step as step_lib
from gpt2_jax.training.metrics import done_line, peak_flops_per_device  # noqa: F401 - train.py's names
from gpt2_jax.training.run_config import DataConfig, TrainConfig
from gpt2_jax.training.signals import Signals


class NonFiniteLossError(RuntimeError):
    pass


def every(step: int, n: int, last: int) -> bool:
    """Whether `step` is one of every n-th steps (n > 0), or the run's last step."""
    return n > 0 and step % n == 0 or step == last


def _prepare_data(config: Any):
    """(train tokens, val tokens) for config.data, prepared by process 0 first, then the others."""
    d = DataConfig.of(config.data)  # typed and checked (run_config.py)
    cache_dir = os.path.expanduser(d.cache_dir)

    def prepare():
        corpus = data_lib.prepare_corpus(d.source, cache_dir)
        if d.val_source:
            return corpus.tokens, data_lib.prepare_corpus(d.val_source, cache_dir).tokens
        return corpus.split(d.val_fraction)

    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils

    result = prepare() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("gpt2_jax: corpus prepared")
    return result if result is not None else prepare()


def train(config: Any, workdir: str) -> dict:
    """Trains as `config` says, resuming from `workdir`'s newest good checkpoint if there is one.

    Returns a summary dict (final step, last loss, last val loss, ...); `done_line` renders it. A
    start that fails leaves no workdir behind if this call created it and nothing was written. The
    workdir's lock (training/workdir_lock.py) is held throughout, by process 0.
    """
    workdir = storage.absolute(workdir)
    created = not storage.exists(workdir)
    lock = _lock(workdir)
    try:
        return _train(config, workdir)
    except BaseException:
        if lock is not None:
            lock.release()
        if created and jax.process_index() == 0 and not _has_results(workdir):
            storage.rmtree(workdir)
        raise
    finally:
        if lock is not None:
            lock.release()


def _lock(workdir: str) -> workdir_lock.WorkdirLock | None:
    """Process 0 takes the workdir's lock (the others get None); every process raises if it could not."""
    held = None
    if jax.process_index() == 0:
        try:
            held = workdir_lock.acquire(workdir, say=lambda line: print(line, flush=True))
        except workdir_lock.WorkdirBusyError:
            distributed.any_process(True)
            raise
    if distributed.any_process(False):
        raise workdir_lock.WorkdirBusyError(f"workdir {workdir} is in use by another run (process 0 says which)")
    return held


def _has_results(workdir: str) -> bool:
    checkpoints = os.path.join(workdir, "checkpoints")
    return storage.exists(os.path.join(workdir, "metrics.jsonl")) or (
        storage.isdir(checkpoints) and any(n.isdigit() for n in storage.listdir(checkpoints))
    )


def _train(config: Any, workdir: str) -> dict:
    t = TrainConfig.of(config.train)  # typed and checked once (run_config.py), before anything is read
    # config.model alone, or the architecture of config.model.init_from (None once the workdir has a checkpoint).
    model_config, pretrained = init_from_lib.resolve(config.model, workdir, cache_dir=config.data.cache_dir)
    mesh = sharding_lib.make_mesh(config.mesh)
    storage.makedirs(workdir)

    train_tokens, val_tokens = _prepare_data(config)
    data_lib.check_enough_tokens(train_tokens, model_config.block_size, t.global_batch_size, name="training split")
    train_iter = data_lib.make_batch_iterator(
        train_tokens, block_size=model_config.block_size, global_batch_size=t.global_batch_size,
        seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count(), name="training split",
    )
    do_eval = t.eval_every > 0 and t.eval_steps > 0
    if do_eval:
        data_lib.check_enough_tokens(val_tokens, model_config.block_size, t.global_batch_size, name="validation split")
    num_steps = t.num_epochs * train_iter.steps_per_epoch if t.num_epochs > 0 else t.num_steps
    if num_steps <= 0:
        raise ValueError(f"config.train.num_steps={t.num_steps} (num_epochs={t.num_epochs}) gives no step to train")
    saved_meta = ckpt_lib.read_newest_meta(os.path.join(workdir, "checkpoints"))
    if saved_meta is not None:  # refuse a different model or a finished run before reading any array
        resume_lib.check_model_matches(saved_meta["model"], model_config)
        resume_lib.check_optimizer(saved_meta, t, os.path.join(workdir, "checkpoints"))
        resume_lib.check_steps(saved_meta["step"], num_steps, t, os.path.join(workdir, "checkpoints"))
    schedule = resume_lib.plan_schedule(saved_meta, t, num_steps)
    prompt = None
    if t.sample_tokens > 0:
        prompt = data_lib.first_line(train_tokens) if t.sample_prompt == "" else t.sample_prompt

    # Checks the mesh against the model and batch, builds the optimizer, schedule and the state's
    # layout, once (the schedule's length needs the corpus when training by epochs); allocates nothing.
    run = run_lib.build_run(model_config, schedule.train_cfg, mesh, schedule.num_steps,
                            document_mask=config.data.document_mask)
    # Pretrained weights, straight into their shards, before any checkpoint folder is made.
    params = None
    if pretrained is not None:
        params = init_from_lib.load_params(pretrained, model_config, run.state_shardings.params)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
    try:
        return _train_loop(config, workdir, run, checkpointer, train_iter, val_tokens,
                           num_steps=num_steps, schedule=schedule, prompt=prompt, params=params)
    finally:
        try:
            checkpointer.close()  # raises CheckpointSaveError if the last save failed: the run is not done
        finally:
            train_iter.close()


def _train_loop(config, workdir, run: run_lib.Run, checkpointer, train_iter, val_tokens, *, num_steps: int,
                schedule: resume_lib.SchedulePlan, prompt: str | list[int] | None, params=None) -> dict:
    """Runs steps up to `num_steps` (the schedule's length is run.num_steps: they differ when a resumed
    run keeps its checkpoint's schedule); `prompt` starts the sample at the end (None: no sample);
    `params` are pretrained weights (config.model.init_from) for a fresh state."""
    t = config.train
    state, tokens_at_start, start_step, finished = _start_state(run, checkpointer, train_iter, t, schedule, params,
                                                              workdir, num_steps)
    summary: dict[str, Any] = {"start_step": start_step, "step": start_step, "loss": None, "val_loss": None,
                               "workdir": workdir}
    if finished:
        return summary
    train_step, evaluate = step_lib.make_train_step(run), validation.make_evaluator(run, val_tokens, t)
    tokens_per_step = t.global_batch_size * run.model_config.block_size
    tokens_seen = _token_count(start_step, tokens_at_start, tokens_per_step)
    meta = {"model": run.model_config.to_dict(), "config": json.loads(config.to_json()),
            "schedule": schedule.to_meta()}
    throughput = metrics.throughput_of(run, t, tokens_per_step)
    wandb_run = wandb_log.WandbRun(t.wandb_project, config, workdir) if t.wandb_project and _is_main() else None
    logger = metrics.Logger(workdir, wandb_run)
    if _is_main():
        metrics.say_what_runs(run, state.params, start_step, num_steps, tokens_per_step, train_iter.steps_per_epoch)

    def save(step: int) -> None:
        logger.flush()  # the records up to this checkpoint, which a resumed run keeps
        checkpointer.save(step, state, train_iter.get_state(), {**meta, "tokens": tokens_seen(step)})

    checkpointer.check_space(_first_save(start_step, num_steps, t), state)  # a full disk is said now
    report = metrics.Reporter(logger, throughput, checkpointer, start_step, num_steps)
    profile, signals = profiling.ProfileWindow(t, workdir, report.say), Signals()
    signals.install()
    step, last_loss, last_val = start_step, None, None
    try:
        while step < num_steps:
            batch = run.global_batch(next(train_iter), t.global_batch_size)
            state, m, left_out = _run_step(train_step, state, batch, step + 1, profile)
            step += 1
            checkpointer.poll()
            last_loss = float(m["loss"])
            _check_finite(last_loss, step, t, checkpointer)
            report.step(last_loss, left_out)
            if every(step, t.log_every, num_steps):
                report.train(step, m, tokens_seen(step))
            if evaluate is not None and every(step, t.eval_every, num_steps):
                last_val = report.eval(step, evaluate(state.params), tokens_seen(step))
            if distributed.any_process(signals.received is not None):
                summary["stopped_by_signal"] = _stop_by_signal(signals, step, save, checkpointer)
                break
            if t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and step < num_steps:
                save(step)
        else:
            if step not in checkpointer.all_steps():
                save(step)
    finally:
        profile.stop(step)  # a run that ended inside the window keeps the trace so far
        signals.uninstall()
        report.close()

    summary.update(step=step, loss=last_loss, val_loss=last_val, params=count_params(state.params))
    summary["loss_curve"] = metrics.plot_loss_curve(workdir)  # also after a signal: the curve so far
    if wandb_run is not None:
        wandb_run.finish(summary["loss_curve"])
    # Sampling (train.py) runs on process 0's devices alone: only where it can see every parameter.
    if "stopped_by_signal" not in summary and prompt is not None and jax.process_count() == 1:
        summary["sample_from"] = (run.model_config, state.params, prompt)
    return summary


def _is_main() -> bool:
    return jax.process_index() == 0


def _token_count(start_step: int, tokens_at_start: int | None, tokens_per_step: int) -> Callable[[int], int]:
    """step -> the tokens trained on up to it (a checkpoint's count where it has one: older ones do not)."""
    if tokens_at_start is None:
        tokens_at_start = start_step * tokens_per_step
    return lambda step: tokens_at_start + (step - start_step) * tokens_per_step


def _first_save(start_step: int, num_steps: int, t) -> int:
    """The step of this call's first checkpoint."""
    if t.checkpoint_every <= 0:
        return num_steps
    return min(num_steps, (start_step // t.checkpoint_every + 1) * t.checkpoint_every)


def _run_step(train_step, state, batch, step: int, profile: profiling.ProfileWindow):
    """Runs `step` and fetches its metrics: (state, metrics, seconds to leave out of throughput when the
    step was traced, else None: the traced step and the tracer's start and stop measure no throughput)."""
    traced, start = profile.begin(step), time.perf_counter()
    state, m = train_step(state, batch)
    m = jax.device_get(m)
    if not traced:
        return state, m, None
    profile.end(step)
    return state, m, time.perf_counter() - start


def _stop_by_signal(signals: Signals, step: int, save: Callable[[int], None], checkpointer) -> int:
    """Checkpoints `step` and waits for it; returns the signal (it may have come to another process)."""
    save(step)
    checkpointer.wait()
    received = int(signals.received or signal.SIGTERM)
    if _is_main():
        print(f"stopped by signal {received} at step {step}; checkpoint written", flush=True)
    return received


def _start_state(run: run_lib.Run, checkpointer, train_iter, t, schedule, params, workdir, num_steps: int):
    """(state, tokens seen before it (None: unknown), its step, whether it is already at num_steps):
    the state restored from the newest usable checkpoint into this run's shards (never whole on one
    device), or fresh (random, or the pretrained `params`); prints what it did."""
    restored = checkpointer.restore_latest(run.abstract_state)
    if restored is not None:
        resume_lib.check_model_matches(restored[2]["model"], run.model_config)  # an older step may differ too
        state, data_state, saved_meta = restored
        data_state, data_note = resume_lib.data_state_for(data_state, t.global_batch_size)
        train_iter.set_state(data_state)
        tokens_at_start = saved_meta.get("tokens")
        notes = [f"resumed from step {saved_meta['step']} ({checkpointer.directory})", schedule.note, data_note]
    else:
        state, tokens_at_start, notes = run_lib.create_train_state(run, params), 0, []
    start_step = int(jax.device_get(state.step))
    nothing_to_do = resume_lib.check_steps(start_step, num_steps, t, checkpointer.directory)
    if nothing_to_do is not None:
        notes = [nothing_to_do]
    if jax.process_index() == 0:  # the records an interrupted run logged past this run's start, which it logs again
        notes.append(metrics_file.keep_through(os.path.join(workdir, "metrics.jsonl"), start_step))
        for note in filter(None, notes):
            print(note, flush=True)
    return state, tokens_at_start, start_step, nothing_to_do is not None


def _check_finite(loss: float, step: int, t, checkpointer) -> None:
    if not math.isfinite(loss) and not t.skip_nonfinite_updates:
        kept = checkpointer.all_steps()[-1] if checkpointer.all_steps() else "none"
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}: training stopped; the last checkpoint ({kept}) is kept. "
            "Lower the learning rate, or set config.train.skip_nonfinite_updates=True to skip such steps."
        )
