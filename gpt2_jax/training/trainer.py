"""The training loop: data, sharded state, steps, eval, logging, checkpoints, signals.

`train(config, workdir)` is all that train.py calls. Everything here runs the same on one CPU,
on the 8 devices of one host and on every host of a pod (each process runs this same code).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gpt2_jax import data as data_lib
from gpt2_jax.model.attention import resolve_attention
from gpt2_jax.model.config import ModelConfig, count_params
from gpt2_jax.training import checkpoint as ckpt_lib
from gpt2_jax.training import init_from as init_from_lib
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import sharding as sharding_lib
from gpt2_jax.training import step as step_lib

# Keys that may differ between a checkpoint and the config resuming it: they change how the
# model is computed, not what its parameters are.
_RESUMABLE_MODEL_CHANGES = frozenset({"dropout", "dtype", "remat", "scan_layers", "attention"})

# Dense bf16 peaks (FLOP/s per device) for the MFU figure. CPUs are measured instead.
_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
}


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


def peak_flops_per_device(override: float = 0.0) -> float:
    """The device's peak FLOP/s: from the config, a table of accelerators, or measured (CPU)."""
    if override > 0:
        return override
    device = jax.devices()[0]
    for name, peak in _PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return peak
    # CPU (or unknown): the measured fp32 matmul rate of this machine, so MFU reads as "fraction
    # of what XLA's GEMM achieves here".
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a = f(a * 1e-3)
    a.block_until_ready()
    return reps * 2 * n**3 / (time.perf_counter() - t) / max(1, jax.local_device_count())


def _summary_writer(logdir: str):
    """tensorboardX's SummaryWriter. tensorboardX imports torch, where it is installed, only to accept
    torch tensors (1-2 s of start-up); we log Python floats, so torch stays hidden while it loads."""
    import sys

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
    """metrics.jsonl + TensorBoard, written by process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
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
                train[r["step"]] = r["loss"]  # a resumed run rewrites steps: keep the latest
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

    Returns a summary dict (final step, last loss, last val loss, ...).
    """
    t = config.train
    workdir = os.path.abspath(os.path.expanduser(workdir))
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

    # Checks the mesh against the model and batch, builds the optimizer, schedule and the state's
    # layout, once (the schedule's length needs the corpus when training by epochs); allocates nothing.
    run = run_lib.build_run(model_config, t, mesh, num_steps)
    # Pretrained weights, straight into their shards, before any checkpoint folder is made.
    params = None
    if pretrained is not None:
        params = init_from_lib.load_params(pretrained, model_config, run.state_shardings.params)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
    try:
        return _train_loop(config, workdir, run, checkpointer, train_iter, val_tokens, params)
    finally:
        checkpointer.close()
        train_iter.close()


def _train_loop(config, workdir, run: run_lib.Run, checkpointer, train_iter, val_tokens, params=None) -> dict:
    t = config.train
    model_config, mesh, num_steps = run.model_config, run.mesh, run.num_steps
    is_main = jax.process_index() == 0
    do_eval = t.eval_every > 0 and t.eval_steps > 0
    saved_steps = checkpointer.all_steps()
    if saved_steps:
        try:  # refuse a different model before trying to read its arrays
            saved_model = checkpointer.read_meta(saved_steps[-1])["model"]
        except Exception:  # noqa: BLE001 - an unreadable newest checkpoint is handled by restore_latest
            saved_model = None
        if saved_model is not None:
            _check_model_matches(saved_model, model_config)
        # Restore straight into the sharded layout of this run's mesh: never whole on one device.
        restored = checkpointer.restore_latest(run.abstract_state)
        if restored is None:
            raise ValueError(f"{checkpointer.directory} holds checkpoints but none is usable (see messages above)")
        _check_model_matches(restored[2]["model"], model_config)  # an older step may differ too
        state, data_state, saved_meta = restored
        train_iter.set_state(data_state)
        if is_main:
            print(f"resumed from step {saved_meta['step']} ({checkpointer.directory})", flush=True)
    else:  # random init, or the pretrained `params` (config.model.init_from)
        state = run_lib.create_train_state(run, params)
    start_step = int(jax.device_get(state.step))

    train_step = step_lib.make_train_step(run)
    eval_step = step_lib.make_eval_step(run) if do_eval else None
    batch_sharding = run.batch_sharding
    meta = {"model": model_config.to_dict(), "config": json.loads(config.to_json())}

    def save(step: int) -> None:
        checkpointer.save(step, state, train_iter.get_state(), meta)

    def evaluate() -> float:
        it = data_lib.make_batch_iterator(
            val_tokens, block_size=model_config.block_size, global_batch_size=t.global_batch_size,
            seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count(),
            name="validation split",
        )
        steps = min(t.eval_steps, it.steps_per_epoch)
        total = 0.0
        for _ in range(steps):
            total += float(eval_step(state.params, _global_batch(next(it), batch_sharding, t.global_batch_size))["loss"])
        it.close()
        return total / steps

    n_params = count_params(state.params)
    tokens_per_step = t.global_batch_size * model_config.block_size
    flops_per_step = model_config.train_flops_per_token(model_config.block_size) * tokens_per_step
    peak = peak_flops_per_device(t.peak_flops_per_device) * jax.device_count()
    logger = _Logger(workdir)
    if is_main:
        print(
            f"model: {n_params:,} parameters | mesh {dict(mesh.shape)} on {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es) | "
            f"steps {start_step}->{num_steps}, {tokens_per_step:,} tokens/step, "
            f"{train_iter.steps_per_epoch} steps/epoch",
            flush=True,
        )
        print("attention: %s (%s)" % resolve_attention(model_config), flush=True)

    signals = _Signals()
    signals.install()
    progress = None
    if is_main:
        from tqdm import tqdm

        progress = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=1.0)

    summary: dict[str, Any] = {"start_step": start_step}
    window_t, window_steps = time.perf_counter(), 0
    step = start_step
    last_loss = last_val = float("nan")
    try:
        while step < num_steps:
            batch = _global_batch(next(train_iter), batch_sharding, t.global_batch_size)
            state, metrics = train_step(state, batch)
            step += 1
            window_steps += 1
            m = jax.device_get(metrics)
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
                tps = window_steps * tokens_per_step / elapsed
                record = {
                    "step": step, "loss": last_loss, "time": time.time(), "tokens": step * tokens_per_step,
                    "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]), "tokens_per_s": tps,
                    "mfu": window_steps * flops_per_step / elapsed / peak,
                }
                if "skipped" in m:
                    record["skipped"] = float(m["skipped"])
                logger.write(record)
                window_t, window_steps = time.perf_counter(), 0
            if do_eval and (step % t.eval_every == 0 or step == num_steps):
                last_val = evaluate()
                logger.write({"step": step, "val_loss": last_val, "time": time.time(), "tokens": step * tokens_per_step})
                if progress is not None:
                    progress.write(f"step {step}: val_loss {last_val:.4f}")
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
        signals.uninstall()
        if progress is not None:
            progress.close()
        logger.close()

    summary.update(step=step, loss=last_loss, val_loss=last_val, params=n_params, workdir=workdir)
    if "stopped_by_signal" not in summary:
        summary["loss_curve"] = plot_loss_curve(workdir)
        # Sampling runs on process 0's devices alone: only where it can see every parameter.
        if t.sample_tokens > 0 and jax.process_count() == 1:
            summary["sample"] = _sample(model_config, state.params, t)
    return summary


def _sample(model_config: ModelConfig, params: Any, t: Any) -> str:
    from gpt2_jax.inference.sampling import generate
    from gpt2_jax.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    prompt = tok.encode(t.sample_prompt, allowed_special="all") or [tok.eot_token]
    params = jax.device_get(params)
    new = generate(model_config, params, [prompt], max_new_tokens=t.sample_tokens, temperature=0.8, top_k=200, seed=t.seed)[0]
    text = tok.decode(prompt + list(new))
    print("---- sample ----\n" + text + "\n----------------", flush=True)
    return text
