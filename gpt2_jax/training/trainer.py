"""The training loop: data, sharded state, steps, eval, logging, checkpoints, signals.

`train(config, workdir)` is all that train.py calls. Everything here runs the same on one CPU,
on the 8 devices of one host and on every host of a pod (each process runs this same code).
What a run reports (records, throughput, plots, the last line) is metrics.py's.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from gpt2_jax import data as data_lib
from gpt2_jax import storage
from gpt2_jax.data import token_bytes
from gpt2_jax.model import loss as loss_lib
from gpt2_jax.model import platform
from gpt2_jax.model.attention import resolve_attention
from gpt2_jax.model.config import count_params
from gpt2_jax.training import checkpoint as ckpt_lib
from gpt2_jax.training import distributed, metrics, metrics_file, profiling, wandb_log, workdir_lock
from gpt2_jax.training import hellaswag as hellaswag_lib
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


def _global_batch(local: dict[str, np.ndarray], sharding, global_batch_size: int) -> dict[str, jax.Array]:
    """Assembles each process's rows into one global array sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
        for k, v in local.items()
    }


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
    t, is_main = config.train, jax.process_index() == 0
    state, tokens_at_start, start_step, finished = _start_state(run, checkpointer, train_iter, t, schedule, params,
                                                              workdir, num_steps)
    summary: dict[str, Any] = {"start_step": start_step, "step": start_step, "loss": None, "val_loss": None,
                               "workdir": workdir}
    if finished:
        return summary
    train_step = step_lib.make_train_step(run)
    evaluate = _evaluator(run, val_tokens, t)
    meta = {"model": run.model_config.to_dict(), "config": json.loads(config.to_json()),
            "schedule": schedule.to_meta()}
    tokens_per_step = t.global_batch_size * run.model_config.block_size
    if tokens_at_start is None:  # absent in older checkpoints
        tokens_at_start = start_step * tokens_per_step
    tokens_seen = lambda step: tokens_at_start + (step - start_step) * tokens_per_step  # noqa: E731
    throughput = _throughput(run, t, tokens_per_step)
    wandb_run = wandb_log.WandbRun(t.wandb_project, config, workdir) if t.wandb_project and is_main else None
    logger = metrics.Logger(workdir, wandb_run)
    if is_main:
        _say_what_runs(run, state, start_step, num_steps, tokens_per_step, train_iter.steps_per_epoch)
    say = (lambda line: print(line, flush=True)) if is_main else (lambda line: None)
    profile = profiling.ProfileWindow(t, workdir, say)

    def save(step: int) -> None:
        logger.flush()  # the records up to this checkpoint, which a resumed run keeps
        checkpointer.save(step, state, train_iter.get_state(), {**meta, "tokens": tokens_seen(step)})

    # A disk too full for a checkpoint is said now, not when the first save fails (maybe hours from now).
    first_save = min(num_steps, (start_step // t.checkpoint_every + 1) * t.checkpoint_every) \
        if t.checkpoint_every > 0 else num_steps
    checkpointer.check_space(first_save, state)
    signals, progress = Signals(), _progress_bar(checkpointer, start_step, num_steps) if is_main else None
    signals.install()
    if progress is not None:
        profile.say = progress.write
    step, last_loss, last_val = start_step, None, None
    try:
        while step < num_steps:
            batch = _global_batch(next(train_iter), run.batch_sharding, t.global_batch_size)
            traced, step_start = profile.begin(step + 1), time.perf_counter()
            state, m = train_step(state, batch)
            step += 1
            m = jax.device_get(m)
            if traced:  # the traced step (and starting, stopping the tracer) is no measure of throughput
                profile.end(step)
                throughput.leave_out(time.perf_counter() - step_start)
            else:
                throughput.step()
            checkpointer.poll()
            last_loss = float(m["loss"])
            _check_finite(last_loss, step, t, checkpointer)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{last_loss:.3f}", refresh=False)
            if every(step, t.log_every, num_steps):
                record = {"step": step, "loss": last_loss, "time": time.time(), "tokens": tokens_seen(step),
                          "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]), **throughput.figures()}
                if "skipped" in m:
                    record["skipped"] = float(m["skipped"])
                logger.write(record)
            if evaluate is not None and every(step, t.eval_every, num_steps):
                scores = evaluate(state.params)
                last_val = scores["val_loss"]
                logger.write({"step": step, **scores, "time": time.time(), "tokens": tokens_seen(step)})
                if progress is not None:
                    progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                throughput.restart()  # don't count eval in tokens/s
            if distributed.any_process(signals.received is not None):
                save(step)
                checkpointer.wait()
                # The signal may have come to another process.
                summary["stopped_by_signal"] = int(signals.received or signal.SIGTERM)
                if is_main:
                    print(f"stopped by signal {summary['stopped_by_signal']} at step {step}; checkpoint written",
                          flush=True)
                break
            if t.checkpoint_every > 0 and step % t.checkpoint_every == 0 and step < num_steps:
                save(step)
        else:
            if step not in checkpointer.all_steps():
                save(step)
    finally:
        profile.stop(step)  # a run that ended inside the window keeps the trace so far
        signals.uninstall()
        if progress is not None:
            progress.close()
        logger.close()

    summary.update(step=step, loss=last_loss, val_loss=last_val, params=count_params(state.params))
    summary["loss_curve"] = metrics.plot_loss_curve(workdir)  # also after a signal: the curve so far
    if wandb_run is not None:
        wandb_run.finish(summary["loss_curve"])
    # Sampling (train.py) runs on process 0's devices alone: only where it can see every parameter.
    if "stopped_by_signal" not in summary and prompt is not None and jax.process_count() == 1:
        summary["sample_from"] = (run.model_config, state.params, prompt)
    return summary


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


def _evaluator(run: run_lib.Run, val_tokens, t):
    """params -> {val_loss: the mean loss over eval_steps global batches (the same windows every
    time), val_bpb (data/token_bytes.py), and the HellaSwag accuracies where config.train.hellaswag
    is set}, or None when evaluation is off."""
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
            total += float(eval_step(params, _global_batch(local, run.batch_sharding, eval_batch))["loss"])
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


def _throughput(run: run_lib.Run, t, tokens_per_step: int) -> metrics.Throughput:
    config = run.model_config
    peak = peak_flops_per_device(t.peak_flops_per_device, run.mesh)
    if peak is None and jax.process_index() == 0:
        print(f"no MFU: the peak FLOP/s of a {jax.devices()[0].device_kind} is not known; "
              "set config.train.peak_flops_per_device", flush=True)
    return metrics.Throughput(tokens_per_step, config.train_flops_per_token(config.block_size) * tokens_per_step, peak)


def _say_what_runs(run: run_lib.Run, state, start_step: int, num_steps: int, tokens_per_step: int,
                   steps_per_epoch: int) -> None:
    mesh, where = run.mesh, platform.of_mesh(run.mesh).name
    print(
        f"model: {count_params(state.params):,} parameters | mesh {dict(mesh.shape)} on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es) | "
        f"steps {start_step}->{num_steps}, {tokens_per_step:,} tokens/step, {steps_per_epoch} steps/epoch",
        flush=True,
    )
    print("attention: {} ({})".format(*resolve_attention(run.model_config, where)), flush=True)
    chunk, why = loss_lib.loss_choice(run.model_config, where)
    print(f"loss: {loss_lib.describe(chunk)} ({why})", flush=True)


def _progress_bar(checkpointer, start_step: int, num_steps: int):
    from tqdm import tqdm

    progress = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)
    checkpointer.say = lambda line: progress.write(line, file=sys.stderr)
    return progress


def _check_finite(loss: float, step: int, t, checkpointer) -> None:
    if not math.isfinite(loss) and not t.skip_nonfinite_updates:
        kept = checkpointer.all_steps()[-1] if checkpointer.all_steps() else "none"
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}: training stopped; the last checkpoint ({kept}) is kept. "
            "Lower the learning rate, or set config.train.skip_nonfinite_updates=True to skip such steps."
        )
