"""The training loop: data, sharded state, steps, eval, logging, checkpoints, signals.

`train(config, workdir)` is all that train.py calls. Everything here runs the same on one CPU,
on the 8 devices of one host and on every host of a pod (each process runs this same code).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from gpt2_jax import data as data_lib
from gpt2_jax.data import token_bytes
from gpt2_jax.model import platform
from gpt2_jax.model.attention import resolve_attention
from gpt2_jax.model import loss as loss_lib
from gpt2_jax.model.config import ModelConfig, count_params
from gpt2_jax.training import checkpoint as ckpt_lib
from gpt2_jax.training import hellaswag as hellaswag_lib
from gpt2_jax.training import init_from as init_from_lib
from gpt2_jax.training import metrics_file
from gpt2_jax.training import profiling
from gpt2_jax.training import resume as resume_lib
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import sharding as sharding_lib
from gpt2_jax.training import step as step_lib
from gpt2_jax.training import wandb_log
from gpt2_jax.training import workdir_lock

# Keys that may differ between a checkpoint and the config resuming it: they change how the
# model is computed, not what its parameters are.
_RESUMABLE_MODEL_CHANGES = frozenset({"dropout", "dtype", "remat", "scan_layers", "attention", "zero_init_proj",
                                      "loss_chunk"})

# Dense bf16 peaks (FLOP/s per device) for the MFU figure.
_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
}
# CPUs have no table entry: the reference is fixed, 64 fp32 FLOPs per cycle (two 512-bit FMA units,
# the most an x86 core has) at 5 GHz, for each CPU this process may use. No CPU computes faster,
# so MFU on a CPU cannot exceed 1 (a jitted fp32 GEMM reaches ~0.25-0.45 of it on 2-CPU machines).
# A matmul timed at start-up is no reference: on a busy machine it measured low and MFU read 1.3-1.5.
CPU_REFERENCE_FLOPS_PER_CPU = 64 * 5e9


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class _Signals:
    """SIGTERM/SIGINT: finish the step, checkpoint, exit 0. A second signal exits at once."""

    received: int | None = None
    previous: dict = dataclasses.field(default_factory=dict)

    def install(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            if self.received is not None:
                os._exit(128 + signum)
            self.received = signum
            print(f"\nreceived signal {signum}: finishing this step, then checkpointing", flush=True)

        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, handler)

    def uninstall(self) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)


def peak_flops_per_device(override: float = 0.0, mesh: Any = None) -> float | None:
    """The reference FLOP/s of one device of `mesh` (default: the mesh in effect, else this process's
    devices) for MFU: the config's override, a TPU/GPU's dense bf16 peak, or on a CPU the fixed
    CPU_REFERENCE_FLOPS_PER_CPU for each CPU this process may use, shared by its devices. None for an
    accelerator missing from the table."""
    if override > 0:
        return override
    kind = platform.of_mesh(mesh)
    for name, peak in _PEAK_FLOPS.items():
        if name.lower() in kind.device_kind.lower():
            return peak
    if kind.name != "cpu":
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return CPU_REFERENCE_FLOPS_PER_CPU * cpus / jax.local_device_count()


def _summary_writer(logdir: str):
    """tensorboardX's SummaryWriter. tensorboardX imports torch, where it is installed, only to accept
    torch tensors (1-2 s of start-up); we log Python floats, so torch stays hidden while it loads."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is in place
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


class _Logger:
    """metrics.jsonl + TensorBoard (+ W&B where config.train.wandb_project is set), written by process 0 only."""

    def __init__(self, workdir: str, wandb_run: wandb_log.WandbRun | None = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.wandb_run = wandb_run
        self.tb = None
        if self.enabled:
            try:
                self.tb = _summary_writer(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard files are optional
                logging.warning("tensorboardX is not installed: no TensorBoard event files")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(workdir: str) -> str | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = {}, {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                train[r["step"]] = r["loss"]
            if "val_loss" in r:
                val[r["step"]] = r["val_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train")
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = os.path.join(workdir, "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _prepare_data(config: Any):
    """(train tokens, val tokens) for config.data, prepared by process 0 first, then the others."""
    d = config.data
    cache_dir = os.path.expanduser(d.cache_dir)

    def prepare():
        corpus = data_lib.prepare_corpus(d.source, cache_dir)
        if d.val_source:
            return corpus.tokens, data_lib.prepare_corpus(d.val_source, cache_dir).tokens
        if not 0.0 < d.val_fraction < 1.0:
            raise ValueError(f"config.data.val_fraction={d.val_fraction} must be in (0, 1) when no val_source is set")
        return corpus.split(d.val_fraction)

    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils

    result = prepare() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("gpt2_jax: corpus prepared")
    return result if result is not None else prepare()


def _sum_over_processes(n: int) -> int:
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int32(n))))  # an eval's bytes: well below 2**31


def _any_process(flag: bool) -> bool:
    """True if `flag` is true on any process, so that all processes stop at the same step."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _check_model_matches(saved: dict, config: ModelConfig) -> None:
    current = config.to_dict()
    differing = sorted(
        k for k in set(saved) | set(current)
        if k not in _RESUMABLE_MODEL_CHANGES and saved.get(k) != current.get(k)
    )
    if differing:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in differing)
        raise ValueError(f"cannot resume: the model in the checkpoint differs from config.model in {detail}")


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
    workdir = os.path.abspath(os.path.expanduser(workdir))
    created = not os.path.exists(workdir)
    lock = _lock(workdir)
    try:
        return _train(config, workdir)
    except BaseException:
        if lock is not None:
            lock.release()
        if created and jax.process_index() == 0 and not _has_results(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
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
            _any_process(True)
            raise
    if _any_process(False):
        raise workdir_lock.WorkdirBusyError(f"workdir {workdir} is in use by another run (process 0 says which)")
    return held


def _has_results(workdir: str) -> bool:
    checkpoints = os.path.join(workdir, "checkpoints")
    return os.path.exists(os.path.join(workdir, "metrics.jsonl")) or (
        os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
    )


def _train(config: Any, workdir: str) -> dict:
    t = config.train
    for check in (profiling.check_config, hellaswag_lib.check_config, wandb_log.check_config):
        check(t)  # README "Watching a run": a bad key or a missing wandb stops the run here
    # config.model alone, or the architecture of config.model.init_from (None once the workdir has a checkpoint).
    model_config, pretrained = init_from_lib.resolve(config.model, workdir)
    mesh = sharding_lib.make_mesh(config.mesh)
    os.makedirs(workdir, exist_ok=True)

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
        _check_model_matches(saved_meta["model"], model_config)
        resume_lib.check_optimizer(saved_meta, t, os.path.join(workdir, "checkpoints"))
        resume_lib.check_steps(saved_meta["step"], num_steps, t, os.path.join(workdir, "checkpoints"))
    schedule = resume_lib.plan_schedule(saved_meta, t, num_steps)
    prompt = None
    if t.sample_tokens > 0:
        prompt = data_lib.first_line(train_tokens) if t.sample_prompt == "" else t.sample_prompt

    # Checks the mesh against the model and batch, builds the optimizer, schedule and the state's
    # layout, once (the schedule's length needs the corpus when training by epochs); allocates nothing.
    run = run_lib.build_run(model_config, schedule.train_cfg, mesh, schedule.num_steps)
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
                schedule: resume_lib.SchedulePlan, prompt: str | list[int] | None,
                params=None) -> dict:
    """Runs steps up to `num_steps` (the schedule's length is run.num_steps: they differ when a resumed
    run keeps its checkpoint's schedule); `prompt` starts the sample at the end (None: no sample);
    `params` are pretrained weights (config.model.init_from) for a fresh state."""
    t = config.train
    model_config, mesh = run.model_config, run.mesh
    is_main = jax.process_index() == 0
    do_eval = t.eval_every > 0 and t.eval_steps > 0
    # Restore straight into the sharded layout of this run's mesh: never whole on one device.
    restored = checkpointer.restore_latest(run.abstract_state)
    if restored is not None:
        _check_model_matches(restored[2]["model"], model_config)  # an older step may differ too
        state, data_state, saved_meta = restored
        tokens_at_start = saved_meta.get("tokens")  # absent in older checkpoints
        data_state, data_note = resume_lib.data_state_for(data_state, t.global_batch_size)
        train_iter.set_state(data_state)
        notes = [f"resumed from step {saved_meta['step']} ({checkpointer.directory})", schedule.note, data_note]
    else:  # random init, or the pretrained `params` (config.model.init_from)
        state = run_lib.create_train_state(run, params)
        tokens_at_start, notes = 0, []
    start_step = int(jax.device_get(state.step))
    summary: dict[str, Any] = {"start_step": start_step, "step": start_step, "loss": None, "val_loss": None,
                               "workdir": workdir}
    nothing_to_do = resume_lib.check_steps(start_step, num_steps, t, checkpointer.directory)
    if nothing_to_do is not None:
        notes = [nothing_to_do]
    if is_main:  # the records an interrupted run logged past this run's start, which it logs again
        notes.append(metrics_file.keep_through(os.path.join(workdir, "metrics.jsonl"), start_step))
        for note in filter(None, notes):
            print(note, flush=True)
    if nothing_to_do is not None:
        return summary

    train_step = step_lib.make_train_step(run)
    eval_step = step_lib.make_eval_step(run) if do_eval else None
    batch_sharding = run.batch_sharding
    meta = {"model": model_config.to_dict(), "config": json.loads(config.to_json()), "schedule": schedule.to_meta()}

    def tokens_seen(step: int) -> int:  # counted per step: the batch size may change on resume
        return tokens_at_start + (step - start_step) * tokens_per_step

    def save(step: int) -> None:
        checkpointer.save(step, state, train_iter.get_state(), {**meta, "tokens": tokens_seen(step)})

    eval_batch = step_lib.eval_batch_size(t)
    hellaswag = hellaswag_lib.HellaSwagEval(run, t.hellaswag, t.hellaswag_examples) if t.hellaswag else None
    val_bytes: list[int] = []  # the bytes the scored targets decode to: counted once (every eval reads the same)

    def evaluate() -> dict[str, float]:
        """val_loss (mean over the scored targets: every target of eval_steps global batches), val_bpb
        (data/token_bytes.py), and the HellaSwag accuracies where config.train.hellaswag is set."""
        it = data_lib.make_batch_iterator(
            val_tokens, block_size=model_config.block_size, global_batch_size=eval_batch,
            seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count(),
            name="validation split",
        )
        steps = min(t.eval_steps * t.grad_accum_steps, it.steps_per_epoch)  # eval_steps global batches
        total, local_bytes = 0.0, 0
        for _ in range(steps):
            local = next(it)
            if not val_bytes:
                local_bytes += token_bytes.count_bytes(local["targets"])
            total += float(eval_step(state.params, _global_batch(local, batch_sharding, eval_batch))["loss"])
        it.close()
        if not val_bytes:
            val_bytes.append(_sum_over_processes(local_bytes))
        val_loss = total / steps
        scores = {"val_loss": val_loss, "val_bpb": token_bytes.bits_per_byte(
            val_loss, steps * eval_batch * model_config.block_size, val_bytes[0])}
        if hellaswag is not None:
            scores.update(hellaswag(state.params))
        return scores

    n_params = count_params(state.params)
    tokens_per_step = t.global_batch_size * model_config.block_size
    if tokens_at_start is None:
        tokens_at_start = start_step * tokens_per_step
    flops_per_step = model_config.train_flops_per_token(model_config.block_size) * tokens_per_step
    peak = peak_flops_per_device(t.peak_flops_per_device, mesh)
    if peak is None and is_main:
        print(f"no MFU: the peak FLOP/s of a {jax.devices()[0].device_kind} is not known; "
              "set config.train.peak_flops_per_device", flush=True)
    wandb_run = wandb_log.WandbRun(t.wandb_project, config, workdir) if t.wandb_project and is_main else None
    logger = _Logger(workdir, wandb_run)
    say = (lambda line: print(line, flush=True)) if is_main else (lambda line: None)
    profile = profiling.ProfileWindow(t, workdir, say)
    if is_main:
        print(
            f"model: {n_params:,} parameters | mesh {dict(mesh.shape)} on {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es) | "
            f"steps {start_step}->{num_steps}, {tokens_per_step:,} tokens/step, "
            f"{train_iter.steps_per_epoch} steps/epoch",
            flush=True,
        )
        print("attention: %s (%s)" % resolve_attention(model_config, platform.of_mesh(mesh).name), flush=True)
        chunk, why = loss_lib.loss_choice(model_config, platform.of_mesh(mesh).name)
        print(f"loss: {loss_lib.describe(chunk)} ({why})", flush=True)
    # A disk too full for a checkpoint is said now, not when the first save fails (maybe hours from now).
    every = t.checkpoint_every
    checkpointer.check_space(min(num_steps, (start_step // every + 1) * every) if every > 0 else num_steps, state)

    signals = _Signals()
    signals.install()
    progress = None
    if is_main:
        from tqdm import tqdm

        progress = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)
        checkpointer.say = lambda line: progress.write(line, file=sys.stderr)
        profile.say = progress.write

    window_t, window_steps = time.perf_counter(), 0
    step = start_step
    last_loss = last_val = None
    try:
        while step < num_steps:
            batch = _global_batch(next(train_iter), batch_sharding, t.global_batch_size)
            step_t = time.perf_counter()
            traced = profile.begin(step + 1)
            state, metrics = train_step(state, batch)
            step += 1
            m = jax.device_get(metrics)
            if traced:  # the traced step (and starting, stopping the tracer) is no measure of throughput
                profile.end(step)
                window_t += time.perf_counter() - step_t
            else:
                window_steps += 1
            checkpointer.poll()
            last_loss = float(m["loss"])
            if not math.isfinite(last_loss) and not t.skip_nonfinite_updates:
                raise NonFiniteLossError(
                    f"loss is {last_loss} at step {step}: training stopped; the last checkpoint "
                    f"({checkpointer.all_steps()[-1] if checkpointer.all_steps() else 'none'}) is kept. "
                    "Lower the learning rate, or set config.train.skip_nonfinite_updates=True to skip such steps."
                )
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{last_loss:.3f}", refresh=False)
            if step % t.log_every == 0 or step == num_steps:
                elapsed = time.perf_counter() - window_t
                record = {
                    "step": step, "loss": last_loss, "time": time.time(), "tokens": tokens_seen(step),
                    "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                }
                if window_steps:  # none when every step since the last record was profiled
                    record["tokens_per_s"] = window_steps * tokens_per_step / elapsed
                if peak is not None and window_steps:
                    record["mfu"] = window_steps * flops_per_step / elapsed / (peak * jax.device_count())
                if "skipped" in m:
                    record["skipped"] = float(m["skipped"])
                logger.write(record)
                window_t, window_steps = time.perf_counter(), 0
            if do_eval and (step % t.eval_every == 0 or step == num_steps):
                scores = evaluate()
                last_val = scores["val_loss"]
                logger.write({"step": step, **scores, "time": time.time(), "tokens": tokens_seen(step)})
                if progress is not None:
                    progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                window_t, window_steps = time.perf_counter(), 0  # don't count eval in tokens/s
            if _any_process(signals.received is not None):
                save(step)
                checkpointer.wait()
                received = signals.received or signal.SIGTERM  # another process may have had it
                if is_main:
                    print(f"stopped by signal {int(received)} at step {step}; checkpoint written", flush=True)
                summary["stopped_by_signal"] = int(received)
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

    summary.update(step=step, loss=last_loss, val_loss=last_val, params=n_params)
    summary["loss_curve"] = plot_loss_curve(workdir)  # also after a signal: the curve so far
    if wandb_run is not None:
        wandb_run.finish(summary["loss_curve"])
    # Sampling runs on process 0's devices alone: only where it can see every parameter.
    if "stopped_by_signal" not in summary and prompt is not None and jax.process_count() == 1:
        summary["sample"] = _sample(model_config, state.params, t, prompt)
    return summary


def _sample(model_config: ModelConfig, params: Any, t: Any, prompt: str | list[int]) -> str:
    from gpt2_jax.inference.sampling import generate
    from gpt2_jax.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    if isinstance(prompt, str):
        prompt = tok.encode(prompt, allowed_special="all") or [tok.eot_token]
    params = jax.device_get(params)
    new = generate(model_config, params, [prompt], max_new_tokens=t.sample_tokens, temperature=0.8, top_k=200, seed=t.seed)[0]
    text = tok.decode(list(prompt) + list(new))
    print("---- sample ----\n" + text + "\n----------------", flush=True)
    return text


def done_line(summary: dict) -> str:
    """The last line train.py prints: the step, the last losses, and where the results are."""
    workdir = summary["workdir"]
    losses, vals = _logged(os.path.join(workdir, "metrics.jsonl"))
    parts = [f"done: step {summary['step']}"]
    if summary["loss"] is not None:
        parts.append(f"loss {summary['loss']:.4f}")
    elif losses:  # nothing trained by this call: the run's last logged loss
        parts.append(f"loss {losses[-1]['loss']:.4f} (step {losses[-1]['step']})")
    if vals:
        parts.append(f"val_loss {vals[-1]['val_loss']:.4f}"
                     + ("" if vals[-1]["step"] == summary["step"] else f" (step {vals[-1]['step']})"))
    files = [name for name in ("metrics.jsonl", "loss.png") if os.path.exists(os.path.join(workdir, name))]
    return ", ".join(parts) + f" | {workdir}: " + ", ".join(files + ["checkpoints/"])


def _logged(path: str) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl's train and eval records (none if it does not exist)."""
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]
