"""train.py end to end on the tiny config, and bad input reported before any compute (one line, exit 2,
no workdir left behind)."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import subprocess_env

from gpt2_jax import data as data_lib
from gpt2_jax.training import metrics as metrics_lib
from gpt2_jax.training import trainer as trainer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(cache, **train):
    sys.path.insert(0, ROOT)
    from configs import tiny

    c = tiny.get_config()
    c.data.cache_dir = str(cache)
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


@pytest.fixture(scope="module")
def cache(corpus_cache):  # conftest: the built-in corpus, tokenised once per session
    return corpus_cache


def test_train_py_end_to_end_on_a_sharded_mesh_on_own_data(tmp_path):
    workdir = tmp_path / "run"
    lines = [f"Line {i}: the {w} sat on the mat and looked at the {w}." for i, w in enumerate(["cat", "dog"] * 300)]
    source = _write(tmp_path / "own.txt", "My own corpus, first line\n" + "\n".join(lines))
    cmd = [
        sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
        "--workdir", str(workdir), "--config.train.num_steps=4", "--config.train.eval_every=2",
        "--config.train.warmup_steps=2", "--config.train.sample_tokens=8", "--config.mesh.data=2",
        "--config.mesh.fsdp=4", f"--config.data.source={source}", f"--config.data.cache_dir={tmp_path / 'cache'}",
    ]
    env = subprocess_env(8)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # The sample starts from the corpus's first line, not from a prompt of the built-in corpus.
    assert "---- sample ----\nMy own corpus, first line\n" in out.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert {"step", "loss", "time", "tokens", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(r)
        assert r["tokens"] == r["step"] * 8 * 32 and np.isfinite(r["loss"]) and r["time"] > 1.7e9
        assert 0 < r["mfu"] < 1  # against the fixed CPU reference
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]  # every eval_every steps, and at the end
    assert train[-1]["loss"] < train[0]["loss"]  # steps 2 and 3 update at a nonzero rate (warmup starts at 0)
    assert (workdir / "loss.png").stat().st_size > 1000
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    assert (workdir / "checkpoints" / "4").is_dir()
    assert out.stdout.splitlines()[-1] == (
        f"done: step 4, loss {train[-1]['loss']:.4f}, val_loss {vals[-1]['val_loss']:.4f} | "
        f"{workdir}: metrics.jsonl, loss.png, checkpoints/"
    )


def test_mfu_reference_on_a_cpu_is_fixed():
    cpus = len(os.sched_getaffinity(0))
    assert metrics_lib.peak_flops_per_device() == metrics_lib.CPU_REFERENCE_FLOPS_PER_CPU * cpus / 8  # 8 devices
    assert metrics_lib.peak_flops_per_device(5e12) == 5e12


def test_unknown_config_key_is_refused(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
           "--workdir", str(tmp_path), "--config.train.num_stepz=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: unknown config key 'num_stepz'") and 'did you mean "num_steps"' in out.stderr
    assert len(out.stderr.splitlines()) == 1


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(train={"global_batch_size": 12}), "global_batch_size=12 is not divisible by mesh data x fsdp"),
        (dict(model={"n_head": 4, "n_kv_head": 1}, mesh={"data": 4, "tensor": 2}), "n_kv_head=1 is not divisible by"),
        (dict(model={"n_head": 2, "n_embd": 32}, mesh={"data": 2, "tensor": 4}), "n_head=2 is not divisible by"),
        (dict(mesh={"data": 4, "fsdp": 4}), "16 devices"),
        (dict(mesh={"data": 0}), "config.mesh.data=0"),
        (dict(train={"grad_accum_steps": 3}), "grad_accum_steps=3"),
    ],
    ids=["batch", "kv-heads-vs-tensor", "heads-vs-tensor", "mesh-too-big", "mesh-zero", "accum"],
)
def test_bad_mesh_or_batch_is_refused_before_any_compute(tmp_path, cache, change, message):
    config = tiny_config(cache)
    for block, values in change.items():
        for k, v in values.items():
            setattr(getattr(config, block), k, v)
    with pytest.raises(ValueError, match=message):
        trainer_lib.train(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # a failed start leaves no workdir


def test_bad_corpora_are_refused(tmp_path, cache):
    config = tiny_config(cache)
    config.data.source = _write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="empty"):
        trainer_lib.train(config, str(tmp_path / "w1"))
    config.data.source = _write(tmp_path / "short.txt", "To be, or not to be, that is the question.")
    with pytest.raises(ValueError, match="block_size"):
        trainer_lib.train(config, str(tmp_path / "w2"))
    bad = tmp_path / "bad.bin"
    data_lib.write_llmc_shard(bad, np.arange(5000) % 50000)
    raw = bytearray(bad.read_bytes())
    raw[:4] = (12345).to_bytes(4, "little")
    bad.write_bytes(bytes(raw))
    config.data.source = str(bad)
    with pytest.raises(ValueError, match="magic"):
        trainer_lib.train(config, str(tmp_path / "w3"))
