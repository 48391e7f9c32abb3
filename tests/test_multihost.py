"""Multi-host training simulated as local processes (JAX's multi-controller runtime over gloo), and preflight.

Two processes with 4 CPU devices each form one 8-device mesh, exactly as two hosts of a pod would:
they must train like one process with 8 devices, write checkpoints either layout restores, resume
exactly, and stop within a bounded time when the other dies. Each process pays seconds of CPU for
jax's start-up and compilation, so the story is three runs, shared through module fixtures: one process
with 8 devices trains 3N steps straight (the reference); two processes resume its step-N checkpoint and
one of them is killed once their step-2N checkpoint is complete; one process with 8 devices resumes
that two-process checkpoint. The one-process runs are this process's own (8 simulated devices, like a
train.py started with 8; train.py's own command line is tests/test_train_cli.py's).
"""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import final_params, losses, subprocess_env

from gpt2_jax.training import preflight
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import sharding as sharding_lib
from gpt2_jax.training import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4  # steps between checkpoints; every run's schedule is for 3N steps
RUN_TIMEOUT_S = 240  # one training run, start-up included
HEARTBEAT_S = 8  # the killed run's --heartbeat_timeout_s (train.py's default is 30)
DEATH_NOTICED_WITHIN_S = HEARTBEAT_S + 30  # a survivor must exit this soon after its peer is killed


def free_port() -> int:
    try:
        import portpicker

        return portpicker.pick_unused_port()
    except ImportError:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


# Every run's overrides of configs/tiny.py: train_cmd's flags and train_here's config.
RUN = {"train.num_steps": 3 * N, "train.checkpoint_every": N, "train.eval_every": 0, "mesh.data": 1, "mesh.fsdp": -1}


def train_cmd(workdir, cache, *extra):
    return [
        sys.executable, "-u", os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
        "--workdir", str(workdir), *(f"--config.{key}={value}" for key, value in RUN.items()),
        f"--config.data.cache_dir={cache}", *extra,
    ]


def env(local_devices: int) -> dict:
    return subprocess_env(local_devices, JAX_PLATFORMS="cpu")


class Processes:
    """`count` processes of one training run, 8 / count local devices each.

    Output goes to log files (a full pipe would block a process); every process still alive is
    killed on exit, whatever happened.
    """

    def __init__(self, workdir, cache, count: int, logdir, *extra: str):
        self.logs = [os.path.join(logdir, f"{os.path.basename(str(workdir))}.{i}.{time.time_ns()}.log")
                     for i in range(count)]
        address = f"127.0.0.1:{free_port()}"
        cmds = [train_cmd(workdir, cache, "--coordinator_address", address, f"--num_processes={count}",
                          f"--process_id={i}", *extra) for i in range(count)]
        devices = 8 // count
        self.procs = []
        try:
            for cmd, log in zip(cmds, self.logs):
                with open(log, "wb") as out:
                    self.procs.append(subprocess.Popen(cmd, env=env(devices), stdout=out, stderr=subprocess.STDOUT))
        except BaseException:
            self.kill_all()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill_all()

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        return [proc.wait(timeout=max(deadline - time.monotonic(), 0.1)) for proc in self.procs]

    def output(self, i: int = 0) -> str:
        with open(self.logs[i], errors="replace") as f:
            return f.read()

    def tails(self) -> str:
        return "\n".join(f"--- process {i} ---\n{self.output(i)[-3000:]}" for i in range(len(self.procs)))


def train_here(workdir, cache) -> str:
    """train_cmd's run in this process (8 devices, as one train.py process with 8); returns what it printed."""
    config = tiny_config()
    for key, value in RUN.items():
        block, name = key.split(".")
        config[block][name] = value
    config.data.cache_dir = str(cache)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        trainer_lib.train(config, str(workdir))
    return out.getvalue()


def assert_close_to(workdir, reference, steps):
    """The losses at `steps`, and the parameters of the checkpoint at the last of them, equal the reference's."""
    want, got = losses(reference), losses(workdir)
    for s in steps:
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])
    at = os.path.join("checkpoints", str(steps[-1]))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
                           final_params(os.path.join(workdir, at)), final_params(os.path.join(reference, at)))


def stopped_at(workdir, step: int, into) -> None:
    """`workdir` as a run stopped right after its step-`step` checkpoint leaves it: that checkpoint and
    the records up to it (the later ones, and the later checkpoints, are left out)."""
    checkpoints = os.path.join(into, "checkpoints")
    shutil.copytree(os.path.join(workdir, "checkpoints", str(step)), os.path.join(checkpoints, str(step)))
    shutil.copy(os.path.join(workdir, "checkpoints", f"{step}.sizes.json"), checkpoints)
    with open(os.path.join(workdir, "metrics.jsonl")) as f, open(os.path.join(into, "metrics.jsonl"), "w") as out:
        out.writelines(line for line in f if json.loads(line)["step"] <= step)


@pytest.fixture(scope="module")
def cache(corpus_cache):  # conftest: the built-in corpus, tokenised once per session
    return corpus_cache


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache):
    """The reference: one process, 8 devices, 3N steps straight (checkpoints at N, 2N and 3N)."""
    workdir = tmp_path_factory.mktemp("single")
    train_here(workdir, cache)
    return workdir


@pytest.fixture(scope="module")
def killed(tmp_path_factory, cache, logdir, single):
    """Two processes resume the reference's step-N checkpoint; process 1 is SIGKILLed once their
    step-2N checkpoint is complete.

    Returns (workdir, snapshot of it taken after the kill, survivor's exit code, seconds from the
    kill to the survivor's exit, the survivor's output).
    """
    workdir = tmp_path_factory.mktemp("killed") / "run"
    stopped_at(single, N, workdir)  # a one-process run stopped after its step-N checkpoint
    step_2n = os.path.join(workdir, "checkpoints", str(2 * N))  # orbax renames a step folder into place when complete
    with Processes(workdir, cache, 2, logdir, f"--heartbeat_timeout_s={HEARTBEAT_S}") as procs:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not os.path.isdir(step_2n):
            assert all(p.poll() is None for p in procs.procs), "a process ended early\n" + procs.tails()
            assert time.monotonic() < deadline, "no step-2N checkpoint in time\n" + procs.tails()
            time.sleep(0.05)
        procs.procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            code = procs.procs[0].wait(timeout=DEATH_NOTICED_WITHIN_S + 60)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - killed_at
        output = procs.output(0)
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", str(3 * N))), "the run ended before the kill"
    snapshot = tmp_path_factory.mktemp("killed_snapshot") / "run"
    shutil.copytree(workdir, snapshot)
    return workdir, snapshot, code, took, output


# --------------------------------------------------------------------------- training
def test_two_processes_train_like_one_with_the_same_devices(killed, single):
    got, want = losses(killed[0]), losses(single)
    assert set(range(N + 1, 2 * N + 1)) <= set(got)
    for s in range(N + 1, 2 * N + 1):  # steps the two processes ran; the records up to N are the reference's
        assert abs(got[s] - want[s]) <= 1e-5, (s, got[s], want[s])


def test_killing_one_process_stops_the_other_in_bounded_time(killed):
    _, _, code, took, output = killed
    assert code is not None and code != 0, output[-3000:]
    assert took < DEATH_NOTICED_WITHIN_S, f"survivor took {took:.1f} s (heartbeat timeout {HEARTBEAT_S} s)"


def test_two_process_run_resumes_exactly_from_a_checkpoint(killed, single):
    workdir, _, _, _, output = killed
    assert f"resumed from step {N}" in output
    # Losses of the resumed steps and the step-2N params (restored here, into one device) match the
    # uninterrupted single-process run.
    assert_close_to(workdir, single, range(N + 1, 2 * N + 1))


def test_one_process_resumes_a_two_process_checkpoint(killed, single, cache):
    workdir = killed[1]  # the killed run as it was: checkpoint 2N written by two processes
    assert f"resumed from step {2 * N}" in train_here(workdir, cache)
    assert_close_to(workdir, single, range(2 * N + 1, 3 * N + 1))


def test_distributed_flags_are_checked_before_jax_is_touched():
    from gpt2_jax.training.distributed import initialize

    with pytest.raises(ValueError, match="go together"):
        initialize("127.0.0.1:1234", 2, None)
    with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, num_processes=2\)"):
        initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="heartbeat_timeout_s=0 must be a positive number of seconds"):
        initialize("127.0.0.1:1234", 2, 0, heartbeat_timeout_s=0)


# --------------------------------------------------------------------------- preflight
def gpt2_config(**train):
    sys.path.insert(0, ROOT)
    from configs import gpt2_124m

    c = gpt2_124m.get_config()
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def tiny_config(**train):
    sys.path.insert(0, ROOT)
    from configs import tiny

    c = tiny.get_config()
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def test_preflight_matches_the_real_sharded_state_of_gpt2_on_fsdp8():
    """GPT-2 124M's widths and vocabulary, two of its layers (each compile of a 12-layer step takes
    ~5 s of CPU here, and the per-layer figures are the same for 2 as for 12)."""
    config = gpt2_config(global_batch_size=8, grad_accum_steps=1)  # mesh: data=1, fsdp=-1
    config.model.preset, config.model.n_layer, config.model.n_head, config.model.n_embd = "", 2, 12, 768
    figures = preflight.report(config)
    assert figures["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and figures["compiled"]

    # The state as training lays it out (create_train_state). Its values do not matter here, so it is built
    # around zeros rather than from a random init, which takes ~10 s of CPU for 124M parameters.
    run = run_lib.run_from_config(config, sharding_lib.make_mesh(config.mesh))
    zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), run.abstract_state.params),
                    out_shardings=run.state_shardings.params)()
    state = run_lib.create_train_state(run, zeros)
    for key, tree in (("params_bytes", state.params), ("opt_state_bytes", state.opt_state), ("state_bytes", state)):
        measured = sharding_lib.bytes_per_device(tree)
        assert len(measured) == 8 and set(measured.values()) == {figures[key]}, (key, measured, figures[key])
    del state
    per_layer = 12 * 768 * 768 + 13 * 768  # attention 4 d^2 + 4 d, MLP 8 d^2 + 5 d, two LayerNorms 4 d
    assert figures["params"] == 124_475_904 - 10 * per_layer  # GPT-2 124M (vocabulary padded to 50,304) less 10 layers
    assert figures["params_bytes"] == pytest.approx(figures["params"] * 4 / 8, rel=0.01)
    assert figures["opt_state_bytes"] == pytest.approx(2 * figures["params_bytes"], rel=0.01)  # AdamW mu, nu
    assert figures["activation_bytes"] > 0 and figures["peak_bytes"] > figures["state_bytes"]
    # XLA's count (layers unrolled) and 6 N D + attention agree to within what the formula leaves out.
    assert figures["flops_per_step"] == pytest.approx(figures["flops_per_step_analytic"], rel=0.2)
    assert figures["warnings"] == []


def test_preflight_plans_gpt2_xl_on_more_devices_than_exist():
    config = gpt2_config()
    config.model.preset = "gpt2-xl"
    figures = preflight.report(config, 64)  # what train.py --preflight --preflight_devices=64 prints
    text = preflight.format_report(figures)
    assert "mesh:      data=1 x fsdp=64 x tensor=1" in text and "compilation skipped" in text
    # A CPU reports no memory size: the report says the overflow check did not run, not "warnings: none".
    assert text.endswith("warnings:  none found, but not checked:\n  - device memory overflow: the device "
                         "reports no memory size (--preflight_device_memory_gb sets it)")
    assert not figures["compiled"] and figures["activation_bytes"] is None and figures["flops_per_step"] is None
    assert figures["params"] == 1_557_686_400  # 1,557,611,200 with the vocabulary padded to 50,304
    # ZeRO-3: every matrix split 64 ways; only small leaves without an "embed" axis stay whole.
    assert figures["params_bytes"] == pytest.approx(1_557_686_400 * 4 / 64, rel=0.05)
    assert figures["params_bytes"] >= 1_557_686_400 * 4 / 64
    assert figures["opt_state_bytes"] == pytest.approx(2 * figures["params_bytes"], rel=0.01)


def test_preflight_warns_about_a_batch_that_does_not_divide():
    figures = preflight.report(tiny_config(global_batch_size=12), 8)  # mesh data=8
    assert not figures["compiled"] and "batch does not divide" in figures["compile_note"]
    assert any("12 / 1 = 12 is not divisible by mesh data x fsdp = 8 x 1 = 8" in w for w in figures["warnings"])
    figures = preflight.report(tiny_config(global_batch_size=8, grad_accum_steps=3), 8)
    assert any("global_batch_size=8 is not divisible by config.train.grad_accum_steps=3" in w
               for w in figures["warnings"])


def test_preflight_warns_about_memory_overflow_and_replicated_state():
    config = gpt2_config()
    config.model.preset = "gpt2-xl"
    figures = preflight.report(config, 64, device_memory_gb=0.1)
    assert figures["device_memory_bytes"] == int(0.1 * 2**30)
    assert any(w.startswith("device memory overflow") for w in figures["warnings"])
    figures = preflight.report(config, 64, device_memory_gb=16)
    assert figures["warnings"] == [] and "warnings:  none found, but not checked:" in preflight.format_report(figures)
    assert figures["unchecked"] == [  # no peak without compilation: only the state was checked
        "peak memory: not computed (" + figures["compile_note"] + "); only parameters + optimizer state were "
        "checked against the device memory"]

    config.mesh.data, config.mesh.fsdp = -1, 1  # pure data parallelism: 17 GiB of state on every device
    warnings = preflight.report(config, 64)["warnings"]
    assert any(w.startswith("state replicated") for w in warnings)
    assert preflight.report(tiny_config(global_batch_size=64), 64)["warnings"] == []  # a tiny one is fine


def test_preflight_refuses_a_mesh_that_cannot_exist():
    config = gpt2_config()
    config.mesh.fsdp = 3
    with pytest.raises(ValueError, match="must equal the device count 64"):
        preflight.report(config, 64)
