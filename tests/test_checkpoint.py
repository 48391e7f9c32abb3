"""Checkpoints: exact resume after SIGKILL (also mid-save), Ctrl-C, restore onto other meshes,
corrupt and incomplete checkpoints, NaN losses, refusing a different model, and what a resume with
other steps, schedule or batch size does.

train.py's interruptions are one story in one workdir (each run is a process start, the most of its
cost); the trainer's own cases go on from copies of one 2-step run, whose compiled step they share."""

import glob
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import TINY_RUN_STEPS, final_params, losses, subprocess_env, tiny_train_cmd

from gpt2_jax.model.config import model_config_from
from gpt2_jax.training import checkpoint as ckpt_lib
from gpt2_jax.training import metrics_file, save_failures
from gpt2_jax.training import optim as optim_lib
from gpt2_jax.training import resume as resume_lib
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import sharding as sharding_lib
from gpt2_jax.training import step as step_lib
from gpt2_jax.training import trainer as trainer_lib
from gpt2_jax.training.run_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = TINY_RUN_STEPS  # the subprocess runs' steps (conftest's uninterrupted run is their reference)
N = STEPS // 3  # their checkpoints: every N steps


def tiny_config(**train):
    sys.path.insert(0, ROOT)
    from configs import tiny

    c = tiny.get_config()
    c.train.eval_every = 0
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def env():
    return subprocess_env(1, optimized=True)  # conftest's reference run compiled the programs at -O2


@pytest.fixture(scope="module")
def cache(corpus_cache):  # conftest: the built-in corpus, tokenised once per session
    return corpus_cache


@pytest.fixture(scope="module")
def straight(tiny_straight_run):  # conftest: train_cmd's run uninterrupted, shared with tests/test_gcs.py
    return tiny_straight_run


def run_until(cmd, stop_when, sig, timeout=240):
    """Starts cmd, sends `sig` as soon as stop_when() is true, returns the exit code."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.time()
    try:
        while proc.poll() is None and time.time() - t0 < timeout:
            if stop_when():
                proc.send_signal(sig)
                break
            time.sleep(0.002)
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode()
    finally:
        if proc.poll() is None:
            proc.kill()


def logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def wait_for(proc, condition, timeout=240):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None and time.time() - t0 < timeout, proc.communicate()[0][-3000:]
        time.sleep(0.01)  # what it waits for is a step or more away (mid-save kills: run_until)


def test_ctrl_c_sigkill_mid_save_and_sigkill_each_resume_exactly_and_a_second_run_is_refused(tmp_path, cache, straight):
    """One workdir, four runs of the same command, each stopped another way and resumed by the next: Ctrl-C
    (checkpoint, plot, exit 0; a second run is refused meanwhile), SIGKILL mid-save of step N, SIGKILL
    once step 2N is saved and training has gone past it, then to the end: the same losses and weights as
    the uninterrupted run, each step logged once."""
    workdir = tmp_path / "run"
    ckdir = workdir / "checkpoints"
    cmd = tiny_train_cmd(workdir, cache, N)
    # 1. Ctrl-C (SIGINT and SIGTERM share one handler) once a few steps are logged.
    first = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # A second run on the same workdir, while the first is training (held still meanwhile).
        wait_for(first, lambda: logged_steps(workdir) >= 1)
        first.send_signal(signal.SIGSTOP)
        try:
            second = subprocess.run(cmd, env=env(), timeout=120, capture_output=True, text=True)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2 and len(second.stderr.splitlines()) == 1, second.stderr
        assert second.stderr.startswith(f"error: workdir {workdir} is in use by another train.py (host "
                                        f"{socket.gethostname()}, pid {first.pid}, since ")
        wait_for(first, lambda: logged_steps(workdir) >= 3)
        first.send_signal(signal.SIGINT)
        out = first.communicate(timeout=240)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out
    loader = ckpt_lib.Checkpointer(str(workdir))
    stopped = loader.all_steps()
    loader.close()
    assert len(stopped) == 1 and stopped[0] < N  # the run's only checkpoint: the one the signal asked for
    stopped = stopped[0]
    assert f"stopped by signal {int(signal.SIGINT)} at step {stopped}" in out
    assert (workdir / "loss.png").stat().st_size > 1000  # the curve so far
    assert f"done: step {stopped}, loss " in out
    # 2. SIGKILL the moment the save of step N is under way (its temporary folder exists).
    mid_save = lambda: bool(glob.glob(str(ckdir / f"{N}*tmp*"))) or (  # noqa: E731
        (ckdir / str(N)).is_dir() and not (ckdir / f"{N}.sizes.json").exists())
    code, out = run_until(cmd, mid_save, signal.SIGKILL)
    assert code == -signal.SIGKILL and f"resumed from step {stopped}" in out, out
    # 3. Either that save had not finished (back to the Ctrl-C's step) or it had (from N): exact either way.
    #    SIGKILL once step 2N is saved and training has gone past it.
    third = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(third, lambda: (ckdir / f"{2 * N}.sizes.json").exists() and logged_steps(workdir) > 2 * N + 1)
        third.kill()
        out = third.communicate()[0]
    finally:
        if third.poll() is None:
            third.kill()
    assert third.returncode == -signal.SIGKILL
    assert re.search(rf"resumed from step ({stopped}|{N}) ", out), out
    assert logged_steps(workdir) < STEPS
    # 4. To the end, taking over the lock the killed run left.
    out = subprocess.run(cmd, check=True, env=env(), timeout=300, capture_output=True, text=True).stdout
    assert f"took over the lock of train.py pid {third.pid} on host {socket.gethostname()}: that process has " \
           "ended" in out
    assert f"resumed from step {2 * N}" in out and f"past step {2 * N} (logged after the checkpoint" in out
    want, got = losses(straight), losses(workdir)
    assert all(got[s] == want[s] for s in range(1, STEPS + 1)), (got, want)  # bitwise: same batches, same math
    jax.tree_util.tree_map(np.testing.assert_array_equal, final_params(workdir), final_params(straight))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once
    assert not (workdir / "train.lock").exists()


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    """(workdir, state): the tiny model's fresh state, made on an fsdp=8 mesh and saved as steps 1 and 2
    (data state {"step": step}). Tests restore it onto other meshes, or damage a copy of it (`copy_to`)."""
    model_config = model_config_from(tiny_config().model)
    mesh = sharding_lib.make_mesh(dict(data=1, fsdp=8, tensor=1))
    state = run_lib.create_train_state(run_lib.build_run(model_config, tiny_config().train, mesh, 10))
    workdir = tmp_path_factory.mktemp("saved_state")
    saver = ckpt_lib.Checkpointer(str(workdir))
    for step in (1, 2):
        saver.save(step, state, {"step": step}, {"model": model_config.to_dict()})
        saver.wait()
    saver.close()
    return workdir, state


def copy_to(tmp_path, workdir):
    """A copy of a fixture's workdir in tmp_path, for a test to change."""
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)


def abstract_state(mesh=None):
    """The tiny model's TrainState as shapes with shardings on `mesh` (default: one device)."""
    config = tiny_config()
    mesh = mesh or sharding_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    return run_lib.build_run(model_config_from(config.model), config.train, mesh, 10).abstract_state


@pytest.mark.parametrize("target", [dict(data=1, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1),
                                    dict(data=8, fsdp=1, tensor=1)], ids=["1-device", "data2xfsdp4", "data8"])
def test_restore_onto_another_mesh(saved_state, target):
    workdir, state = saved_state  # written from an fsdp=8 mesh
    devices = jax.devices()[:1] if target["data"] * target["fsdp"] == 1 else None
    mesh = sharding_lib.make_mesh(target, devices=devices)
    loader = ckpt_lib.Checkpointer(str(workdir))
    restored, data_state, meta = loader.restore_latest(abstract_state(mesh))
    loader.close()
    assert data_state == {"step": 2} and meta["step"] == 2
    leaf = restored.params["blocks"]["mlp"]["fc"]["kernel"]
    assert leaf.sharding.mesh.shape == mesh.shape  # landed in the new layout
    if target["fsdp"] > 1:  # each device holds only its shard
        assert leaf.addressable_shards[0].data.shape[1] == leaf.shape[1] // target["fsdp"]
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored.params, state.params
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored.opt_state, state.opt_state
    )


def test_truncated_checkpoint_is_reported_and_the_previous_one_used(tmp_path, saved_state, capsys):
    copy_to(tmp_path, saved_state[0])
    abstract = abstract_state()
    step2 = tmp_path / "checkpoints" / "2"
    files = sorted((p for p in step2.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest = files[-1]
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    problem = r"checkpoint step 2 \(file .* has \d+ bytes, \d+ were written\): unusable, "
    # generate.py's loader falls back, says so once, and leaves the workdir as it is...
    config, _ = ckpt_lib.restore_params(str(tmp_path))
    assert re.fullmatch(problem + r"skipped; using step 1\n", capsys.readouterr().err)
    # ...a step folder named on purpose is that step or an error...
    with pytest.raises(ValueError, match=r"checkpoints/2 is unusable: file .* bytes") as error:
        ckpt_lib.restore_params(str(tmp_path / "checkpoints" / "2"))
    assert "using" not in str(error.value) and capsys.readouterr().err == ""
    # ...and a training run falls back too, moving the bad step aside so that it can save step 2 again.
    loader = ckpt_lib.Checkpointer(str(tmp_path))
    restored = loader.restore_latest(abstract)
    assert restored is not None and restored[1] == {"step": 1}
    said = capsys.readouterr().err
    assert re.fullmatch(problem + r"moved aside to 2\.corrupt-\d{8}T\d{6}Z; using step 1\n", said)
    aside = tmp_path / "checkpoints" / said.split("moved aside to ")[1].split(";")[0]
    assert (aside / "params").is_dir() and aside.with_name(aside.name + ".sizes.json").exists()
    assert loader.all_steps() == [1] and not step2.exists()
    loader.save(2, restored[0], {"step": 2}, restored[2])
    loader.close()
    assert ckpt_lib.verify_step(str(tmp_path / "checkpoints"), 2) is None
    assert ckpt_lib.newest_meta(str(tmp_path))[1] == 2 and capsys.readouterr().err == ""
    ckpt_lib.Checkpointer(str(tmp_path)).close()  # orbax's clean-up of temporary folders leaves it alone
    assert (aside / "params").is_dir()


def two_step_config(cache, **train):
    """A 2-step run saving every step. Its schedule, and so its compiled step, is every trainer run's
    here: a run that goes on past step 2 keeps the checkpoint's schedule."""
    config = tiny_config(num_steps=2, checkpoint_every=1, warmup_steps=1)
    config.data.cache_dir = str(cache)
    config.mesh.data, config.mesh.fsdp = 1, 8  # saved_state's mesh: one compiled init serves both
    config.train.update(train)
    return config


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, cache):
    """The workdir of train(two_step_config): checkpoints 1 and 2, and their metrics. Tests go on from a copy."""
    workdir = tmp_path_factory.mktemp("two_steps")
    trainer_lib.train(two_step_config(cache), str(workdir))
    return workdir


def test_a_truncated_newest_checkpoint_is_replaced_by_the_runs_that_follow(tmp_path, two_steps, cache, capsys):
    config = two_step_config(cache)
    copy_to(tmp_path, two_steps)
    ckdir = tmp_path / "checkpoints"
    biggest = max((p for p in (ckdir / "2").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 3.1')  # the torn end of a write cut by SIGKILL
    capsys.readouterr()
    # The same command again: back to step 1, step 2 moved aside, then saved anew at the end.
    trainer_lib.train(config, str(tmp_path))
    out, err = capsys.readouterr()
    assert re.search(r"checkpoint step 2 \(file .*\): unusable, moved aside to 2\.corrupt-\S+; using step 1\n", err)
    assert "resumed from step 1" in out
    assert "metrics.jsonl: dropped 1 record(s) past step 1 (logged after the checkpoint this run starts from) and " \
           "1 unreadable line(s) (a write cut short)" in out
    assert len([n for n in os.listdir(ckdir) if re.fullmatch(r"2\.corrupt-\d{8}T\d{6}Z", n)]) == 1
    # Asking for more steps: resumes from the new step 2, with nothing to skip, and saves step 3.
    config.train.num_steps = 3
    trainer_lib.train(config, str(tmp_path))
    out, err = capsys.readouterr()
    assert "resumed from step 2" in out and "unusable" not in err and "dropped" not in out
    loader = ckpt_lib.Checkpointer(str(tmp_path))
    assert loader.all_steps() == [1, 2, 3]
    assert all(ckpt_lib.verify_step(str(ckdir), s) is None for s in (2, 3))
    loader.close()
    assert ckpt_lib.restore_params(str(ckdir / "2"))[0].n_embd == 32  # the new step 2 loads on its own
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


def test_metrics_keep_through_drops_later_and_torn_records_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert metrics_file.keep_through(str(path), 3) is None and not path.exists()
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)] + [json.dumps({"step": 3, "val_loss": 2.0})]
    path.write_text("\n".join(lines) + "\n")
    before = path.stat().st_mtime_ns
    assert metrics_file.keep_through(str(path), 3) is None and path.stat().st_mtime_ns == before  # untouched
    path.write_bytes(path.read_bytes() + json.dumps({"step": 4, "loss": 1.0}).encode() + b"\n" + b'{"step": 5, "lo\xc3')
    assert metrics_file.keep_through(str(path), 3) == (
        "metrics.jsonl: dropped 1 record(s) past step 3 (logged after the checkpoint this run starts from) and "
        "1 unreadable line(s) (a write cut short)")
    assert path.read_text() == "\n".join(lines) + "\n"
    assert metrics_file.keep_through(str(path), 0) is not None and path.read_text() == ""
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_incomplete_checkpoint_is_ignored(tmp_path, saved_state):
    copy_to(tmp_path, saved_state[0])
    abstract = abstract_state()
    ck = tmp_path / "checkpoints"
    shutil.rmtree(ck / "2")
    (ck / "2.orbax-checkpoint-tmp-1234").mkdir()  # what a save killed half-way leaves behind
    (ck / "2.orbax-checkpoint-tmp-1234" / "junk").write_bytes(b"\0" * 10)
    loader = ckpt_lib.Checkpointer(str(tmp_path))
    assert loader.all_steps() == [1]
    assert loader.restore_latest(abstract)[1] == {"step": 1}
    loader.close()


def test_nan_loss_stops_training_naming_the_step(tmp_path, two_steps, cache, monkeypatch):
    config = two_step_config(cache, num_steps=5)  # on from step 2, saving step 3, then a NaN at step 4
    copy_to(tmp_path, two_steps)
    real = step_lib.make_train_step

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)

        def call(state, batch):
            new_state, metrics = step(state, batch)
            if int(jax.device_get(new_state.step)) == 4:
                metrics = dict(metrics, loss=jax.numpy.float32(float("nan")))
            return new_state, metrics

        return call

    monkeypatch.setattr(step_lib, "make_train_step", poisoned)
    with pytest.raises(trainer_lib.NonFiniteLossError, match="loss is nan at step 4"):
        trainer_lib.train(config, str(tmp_path))
    assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [1, 2, 3]  # the last good one stays, no step 4


def _failing_saves(monkeypatch, make_it_fail, at_step):
    """Checkpointer saves in which `make_it_fail(checkpointer)` runs just before the save of `at_step`."""
    real = ckpt_lib.Checkpointer._save

    def save(self, step, *args):
        if step == at_step:
            make_it_fail(self)
        return real(self, step, *args)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "_save", save)


def test_a_failed_save_ends_the_run_in_one_line_leaving_earlier_checkpoints_usable(tmp_path, two_steps, cache,
                                                                                    monkeypatch, capsys, caplog):
    config = two_step_config(cache, num_steps=4)  # on from step 2: the save of step 3 fails
    copy_to(tmp_path / "efbig", two_steps)
    # A real failure, written by orbax's background thread: the file size limit drops to 1 MB for the
    # save of step 3 (the OS refuses writes past it with EFBIG, much as a full disk does with ENOSPC).
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us
    _failing_saves(monkeypatch, lambda _: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1])), 3)
    try:
        with pytest.raises(save_failures.CheckpointSaveError) as error:
            trainer_lib.train(config, str(tmp_path / "efbig"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    assert str(error.value) == ("checkpoint at step 3 not saved: file too large (errno 27); the checkpoint at step 2 "
                                "is intact and a rerun resumes from it")
    ckdir = tmp_path / "efbig" / "checkpoints"
    assert sorted(os.listdir(ckdir)) == ["1", "1.sizes.json", "2", "2.sizes.json"]  # the half-written step 3 is gone
    assert ckpt_lib.restore_params(str(tmp_path / "efbig"))[0].n_embd == 32
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # orbax's tracebacks kept quiet
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "efbig" / "train.lock").exists()


def test_a_full_disk_is_said_before_the_save_and_named_when_it_fails(tmp_path, saved_state, monkeypatch, capsys):
    workdir, state = saved_state
    copy_to(tmp_path, workdir)
    ckdir = tmp_path / "checkpoints"
    monkeypatch.setattr(save_failures, "free_bytes", lambda directory: 3 << 20)

    def full(checkpointer):  # tensorstore's error for a full disk, and the folder it leaves behind
        os.makedirs(os.path.join(checkpointer.directory, "3.orbax-checkpoint-tmp", "params"))
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"opt_state.1.0.mu.wte.embedding/0.0\" in OCDBT database: "
                         "Failed to write 4358144 bytes to file 12: No space left on device [os_error_code='28']")

    _failing_saves(monkeypatch, full, 3)
    saver = ckpt_lib.Checkpointer(str(tmp_path))
    capsys.readouterr()
    with pytest.raises(save_failures.CheckpointSaveError) as error:
        saver.save(3, state, {"step": 3}, {"model": {}})
    saver.close()
    with open(ckdir / "2.sizes.json") as f:
        need = round(sum(json.load(f).values()) / 2**20)  # as much as the checkpoint before
    assert str(error.value) == (f"checkpoint at step 3 not saved: no space left on device (needs ~{need} MB, 3 MB free "
                                f"in {ckdir}); the checkpoint at step 2 is intact and a rerun resumes from it")
    assert capsys.readouterr().err == (f"warning: 3 MB free in {ckdir}, but a checkpoint takes ~{need} MB: the save at "
                                       "step 3 will likely fail (no space left on device)\n")
    assert sorted(os.listdir(ckdir)) == ["1", "1.sizes.json", "2", "2.sizes.json"]  # the partial folder is gone
    assert ckpt_lib.newest_meta(str(tmp_path))[1] == 2
    # A step that exists is never written over (orbax would rewrite its metadata before refusing).
    saver = ckpt_lib.Checkpointer(str(tmp_path))
    with pytest.raises(save_failures.CheckpointSaveError, match=f"checkpoint at step 2 not saved: {ckdir}/2 already "):
        saver.save(2, state, {"step": 2}, {"model": {}})
    saver.close()


def test_a_last_save_that_fails_in_the_background_is_raised_by_close(tmp_path, saved_state):
    workdir, state = saved_state
    copy_to(tmp_path, workdir)
    saver = ckpt_lib.Checkpointer(str(tmp_path))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))  # the OS refuses writes past 1 MB
    try:
        saver.save(3, state, {"step": 3}, {"model": {}})  # returns while orbax writes
        with pytest.raises(save_failures.CheckpointSaveError) as error:
            saver.close()  # as train() does after the last step: the run must not be reported done
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    assert str(error.value) == ("checkpoint at step 3 not saved: file too large (errno 27); the checkpoint at step 2 "
                                "is intact and a rerun resumes from it")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "1.sizes.json", "2", "2.sizes.json"]


def test_resume_with_other_steps_schedule_or_model(tmp_path, two_steps, cache, capsys):
    config = two_step_config(cache)
    copy_to(tmp_path, two_steps)

    config.train.num_steps = 1  # fewer steps than the checkpoint has done: said plainly, nothing runs
    with pytest.raises(ValueError, match=r"checkpoint in .* is at step 2, past config.train.num_steps=1: nothing"):
        trainer_lib.train(config, str(tmp_path))
    config.train.num_steps = 2  # as many: nothing to train, and no NaN loss
    summary = trainer_lib.train(config, str(tmp_path))
    assert "nothing to train: the checkpoint in" in capsys.readouterr().out and summary["loss"] is None
    assert re.match(r"done: step 2, loss \d+\.\d+ \(step 2\) \| ", trainer_lib.done_line(summary))

    # Extending with another learning rate: the checkpoint's schedule (and so its compiled step) is
    # kept, and that is said.
    config.train.num_steps, config.train.learning_rate = 3, 1e-3
    trainer_lib.train(config, str(tmp_path))
    assert "resume: the learning-rate schedule stays the checkpoint's (2 steps, warmup 1, learning_rate 0.003 to " \
           "min_lr 0.0003), not the config's (num_steps 2 -> 3, learning_rate 0.003 -> 0.001): lr at step 3 is " \
           "0.0003; from step 3 on it stays at min_lr=0.0003" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["tokens"] == 3 * 8 * 32
    assert records[-1]["lr"] == pytest.approx(3e-4)  # no jump back up

    config.model.n_layer = 3
    config.model.n_embd = 64
    with pytest.raises(ValueError, match=r"differs from config.model in n_embd: checkpoint 32 vs config 64, n_layer"):
        trainer_lib.train(config, str(tmp_path))


def test_schedule_on_resume_is_kept_or_replanned_on_purpose():
    t = tiny_config(num_steps=30, warmup_steps=5).train
    saved = {"step": 30, "schedule": {"num_steps": 30, "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_steps": 5}}
    assert resume_lib.plan_schedule(saved, t, 30).note is None  # the same run resumed: nothing to say
    # A new run: the config's own schedule (config.train, typed: training/run_config.py).
    assert resume_lib.plan_schedule(None, t, 40) == resume_lib.SchedulePlan(TrainConfig.of(t), 40, None)
    t.num_steps = 40
    kept = resume_lib.plan_schedule(saved, t, 40)
    # (a checkpoint from before lr_schedule existed followed a cosine, and from now on says so)
    assert kept.num_steps == 30 and kept.to_meta() == {**saved["schedule"], "lr_schedule": "cosine"}
    assert "lr at step 31 is 0.0003; from step 31 on it stays at min_lr=0.0003" in kept.note
    t.resume_schedule = "replan"
    replanned = resume_lib.plan_schedule(saved, t, 40)
    want = float(optim_lib.make_schedule(t, 40)(30))  # ~1.1e-3: the jump the user asked for
    assert replanned.num_steps == 40 and replanned.train_cfg == TrainConfig.of(t)
    assert f"lr at step 31 is {want:.3g}, the checkpoint's plan had 0.0003" in replanned.note
    # Checkpoints from before the schedule was saved: their config says what it was.
    old = {"step": 30, "config": {"train": {"num_steps": 30, "num_epochs": 0, **saved["schedule"]}}}
    assert resume_lib.saved_schedule(old) == {**saved["schedule"], "lr_schedule": "cosine"}
    # A warmup-stable-decay run resumed under a cosine config keeps its own shape, and says which.
    t.resume_schedule, t.lr_schedule, t.decay_fraction = "keep", "wsd", 0.5
    wsd = resume_lib.plan_schedule(None, t, 30).to_meta()
    assert wsd["lr_schedule"] == "wsd" and wsd["decay_fraction"] == 0.5
    t.lr_schedule = "cosine"
    kept = resume_lib.plan_schedule({"step": 20, "schedule": wsd}, t, 30)
    assert kept.train_cfg.lr_schedule == "wsd" and "lr_schedule wsd -> cosine" in kept.note
    assert "wsd with decay_fraction 0.5" in kept.note
    t.resume_schedule = "stretch"
    with pytest.raises(ValueError, match="resume_schedule='stretch' must be one of"):
        resume_lib.plan_schedule(saved, t, 40)


def test_a_new_batch_size_on_resume_is_said():
    state = {"step": 3, "seed": 0, "num_windows": 100, "block_size": 32, "global_batch_size": 8}
    assert resume_lib.data_state_for(state, 8) == (state, None)
    moved, note = resume_lib.data_state_for(state, 16)
    assert moved["step"] == 2 and moved["global_batch_size"] == 16
    assert note == ("resume: global_batch_size 8 -> 16 (checkpoint -> config): the data goes on at window 32 of "
                    "epoch 0's order, in batches of 16")


def test_restore_params_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt_lib.restore_params(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        ckpt_lib.restore_params(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        ckpt_lib.restore_params(str(tmp_path / "other"))
