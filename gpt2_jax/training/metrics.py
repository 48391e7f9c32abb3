"""What a run reports: metrics.jsonl and TensorBoard records, throughput and MFU, the loss plot,
and the lines printed at the start and the end.

Process 0 writes everything (`Logger`); the other processes' loggers do nothing.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any

import jax
from absl import logging

from gpt2_jax import storage
from gpt2_jax.model import loss as loss_lib
from gpt2_jax.model import platform
from gpt2_jax.model.attention import resolve_attention
from gpt2_jax.model.config import count_params
from gpt2_jax.training import metrics_file

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
    torch tensors (seconds of start-up); we log Python floats, so torch stays hidden while it loads."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is in place
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


class Logger:
    """metrics.jsonl + TensorBoard (+ W&B where config.train.wandb_project is set), written by process 0 only.

    In a gs:// workdir tensorboardX writes its event file to Cloud Storage itself (through
    google-cloud-storage, uploading the file whole every two minutes and at the end)."""

    def __init__(self, workdir: str, wandb_run: Any = None):
        self.enabled = jax.process_index() == 0
        self.wandb_run = wandb_run  # training/wandb_log.py's WandbRun, or None
        self.metrics = metrics_file.Writer(os.path.join(workdir, "metrics.jsonl")) if self.enabled else None
        self.tb = None
        if self.enabled:
            try:
                self.tb = _summary_writer(os.path.join(workdir, "tensorboard"))
            except ImportError as e:  # TensorBoard files are optional
                logging.warning("no TensorBoard event files: %s", e)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(record)
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(record)

    def flush(self) -> None:
        """Puts metrics.jsonl in the workdir up to date (a gs:// one is uploaded in batches)."""
        if self.enabled:
            self.metrics.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(workdir: str) -> str | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not storage.exists(path):
        return None
    from matplotlib.figure import Figure  # not pyplot: no backend or global figure state to load

    train, val = {}, {}
    for line in storage.read_text(path).splitlines():
        if line.strip():
            r = json.loads(line)
            if "loss" in r:
                train[r["step"]] = r["loss"]
            if "val_loss" in r:
                val[r["step"]] = r["val_loss"]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train")
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = os.path.join(workdir, "loss.png")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    storage.write_bytes(out, png.getvalue())
    return out


class Throughput:
    """tokens/s and MFU over the steps since the last record, leaving out what is not training
    (evaluations, checkpoints: call `restart` after them)."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, peak: float | None):
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def step(self) -> None:
        self.steps += 1

    def leave_out(self, seconds: float) -> None:
        """A step not to count (a profiled one): its time goes too."""
        self.start += seconds

    def figures(self) -> dict[str, float]:
        """{"tokens_per_s", "mfu" (when the peak is known)} since the last restart, then restarts; {}
        when every step since was left out."""
        elapsed = time.perf_counter() - self.start
        out = {}
        if self.steps:
            out["tokens_per_s"] = self.steps * self.tokens_per_step / elapsed
            if self.peak is not None:
                out["mfu"] = self.steps * self.flops_per_step / elapsed / (self.peak * jax.device_count())
        self.restart()
        return out


def throughput_of(run: Any, t: Any, tokens_per_step: int) -> Throughput:
    """The run's Throughput; says once (process 0) when MFU cannot be given."""
    config = run.model_config
    peak = peak_flops_per_device(t.peak_flops_per_device, run.mesh)
    if peak is None and jax.process_index() == 0:
        print(f"no MFU: the peak FLOP/s of a {jax.devices()[0].device_kind} is not known; "
              "set config.train.peak_flops_per_device", flush=True)
    return Throughput(tokens_per_step, config.train_flops_per_token(config.block_size) * tokens_per_step, peak)


class Reporter:
    """What the loop shows as it goes: train and eval records (`Logger`), throughput, and on process 0 a
    progress bar (tqdm) with the lines written above it (the checkpointer's too). The other processes'
    reporters keep time and print nothing."""

    def __init__(self, logger: Logger, throughput: Throughput, checkpointer: Any, start_step: int, num_steps: int):
        self.logger, self.throughput, self.bar = logger, throughput, None
        if jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)
            checkpointer.say = lambda line: self.bar.write(line, file=sys.stderr)

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)

    def step(self, loss: float, left_out: float | None) -> None:
        """A step done; `left_out`: the seconds of a step not to count in throughput (a traced one), or None."""
        if left_out is None:
            self.throughput.step()
        else:
            self.throughput.leave_out(left_out)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def train(self, step: int, m: dict, tokens: int) -> None:
        """The train record of `step` from its metrics `m` (host values), with throughput since the last."""
        record = {"step": step, "loss": float(m["loss"]), "time": time.time(), "tokens": tokens,
                  "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]), **self.throughput.figures()}
        if "skipped" in m:
            record["skipped"] = float(m["skipped"])
        self.logger.write(record)

    def eval(self, step: int, scores: dict[str, float], tokens: int) -> float:
        """The eval record of `step`; returns its val_loss. The evaluation's time is not training's."""
        self.logger.write({"step": step, **scores, "time": time.time(), "tokens": tokens})
        self.say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        self.throughput.restart()
        return scores["val_loss"]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.logger.close()


def say_what_runs(run: Any, params: Any, start_step: int, num_steps: int, tokens_per_step: int,
                  steps_per_epoch: int) -> None:
    """The lines a run starts with: model size, mesh, steps, and the attention and loss it runs."""
    mesh, where = run.mesh, platform.of_mesh(run.mesh).name
    print(
        f"model: {count_params(params):,} parameters | mesh {dict(mesh.shape)} on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es) | "
        f"steps {start_step}->{num_steps}, {tokens_per_step:,} tokens/step, {steps_per_epoch} steps/epoch",
        flush=True,
    )
    print("attention: {} ({})".format(*resolve_attention(run.model_config, where)), flush=True)
    chunk, why = loss_lib.loss_choice(run.model_config, where)
    print(f"loss: {loss_lib.describe(chunk)} ({why})", flush=True)


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
    files = [name for name in ("metrics.jsonl", "loss.png") if storage.exists(os.path.join(workdir, name))]
    return ", ".join(parts) + f" | {workdir}: " + ", ".join(files + ["checkpoints/"])


def _logged(path: str) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl's train and eval records (none if it does not exist)."""
    if not storage.exists(path):
        return [], []
    records = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]
