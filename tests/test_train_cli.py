"""train.py end to end on the tiny config, and bad input reported before any compute."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2_jax import data as data_lib
from gpt2_jax.training import trainer as trainer_lib
from helpers import subprocess_env

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
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus_cache")


def test_train_py_end_to_end_on_a_sharded_mesh(tmp_path, cache):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
        "--workdir", str(workdir), "--config.train.num_steps=6", "--config.train.eval_every=3",
        "--config.train.warmup_steps=2", "--config.train.sample_tokens=8", "--config.mesh.data=2",
        "--config.mesh.fsdp=4", f"--config.data.cache_dir={cache}",
    ]
    env = subprocess_env(8)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "---- sample ----" in out.stdout and "done: step 6" in out.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        assert {"step", "loss", "time", "tokens", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(r)
        assert r["tokens"] == r["step"] * 8 * 32 and np.isfinite(r["loss"]) and r["time"] > 1.7e9
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert train[-1]["loss"] < train[0]["loss"]
    assert (workdir / "loss.png").stat().st_size > 1000
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    assert (workdir / "checkpoints" / "6").is_dir()


def test_unknown_config_key_is_refused(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
           "--workdir", str(tmp_path), "--config.train.num_stepz=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "unknown config key 'num_stepz'" in out.stderr and 'did you mean "num_steps"' in out.stderr
    assert "Traceback" not in out.stderr


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
    assert not (tmp_path / "w" / "checkpoints").exists()


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
