"""gs:// workdirs and sources, for real, against a local Cloud Storage emulator (gcp-storage-emulator)
that this module starts: gcsfs and google-cloud-storage reach it through STORAGE_EMULATOR_HOST,
tensorstore (orbax's arrays) through TENSORSTORE_GCS_HTTP_URL.

The emulator's downloads lack the `x-goog-generation` header that Cloud Storage sends, which tensorstore
reads (without it, its next conditional request fails with "Malformed StorageGeneration"): EMULATOR
starts it with that header added.

The round trip: train.py into gs://BUCKET/run on a corpus of token shards in the bucket, SIGKILL once
its first checkpoint is complete (mid-run, or mid-save of a later one: saving to the emulator is slow),
resume, and compare with an uninterrupted local run bit for bit; then sample and export from the gs://
workdir, in this process, with what generate.py and `python -m gpt2_jax.export` call (their command
lines are tests/test_generate_cli.py's). Also the workdir lock as an object, and init_from from a bucket.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import TINY_RUN_STEPS, final_params, losses, require, subprocess_env, tiny_train_cmd

from gpt2_jax.checkpoints import load_model
from gpt2_jax.data.tokenizer import EOT_ID, get_tokenizer
from gpt2_jax.export import export_checkpoint
from gpt2_jax.inference.sampling import generate
from gpt2_jax.model.hf import load_hf_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "gpt2-jax-test"
STEPS = TINY_RUN_STEPS  # helpers.tiny_train_cmd's runs, as tests/test_checkpoint.py's: their programs are shared
N = STEPS // 3  # steps between checkpoints


EMULATOR = """
import sys
from gcp_storage_emulator.handlers import objects

download = objects.download


def with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the 404 is the answer
        return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]


objects.download = with_generation  # before the server's routing table is built
from gcp_storage_emulator.__main__ import main

main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def emulator():
    """The emulator's address, running for this module, with BUCKET created; this process's environment
    points the libraries at it while the module runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", EMULATOR, "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--default-bucket", BUCKET, "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    point = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
             # gcsfs's default probes for zonal / hierarchical buckets through an API the emulator lacks
             "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in point}
    os.environ.update(point)  # before gcsfs is imported: it reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT then
    require("gcsfs")
    require("gcp_storage_emulator")
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the storage emulator did not start"
                time.sleep(0.05)
        yield point
    finally:
        proc.kill()
        proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fs():
    import fsspec

    return fsspec.filesystem("gcs", finalize_on_close=True)


def train_cmd(workdir, cache, source):
    return tiny_train_cmd(workdir, cache, N, f"--config.data.source={source}")


def env(point):
    return subprocess_env(1, optimized=True, **point)


def run(cmd, point):
    return subprocess.Popen(cmd, env=env(point), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc) -> str:
    """proc's stdout, once it has exited 0."""
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_train_kill_resume_generate_and_export_in_a_bucket(emulator, corpus_cache, tiny_straight_run, tmp_path):
    # The corpus as token shards in the bucket: the same tokens as the built-in corpus the local run reads.
    prepared = next(os.path.join(corpus_cache, n) for n in os.listdir(corpus_cache) if n.startswith("shakespeare-"))
    for name in os.listdir(prepared):
        if name.endswith(".bin"):
            fs().put_file(os.path.join(prepared, name), f"{BUCKET}/corpus/{name}")
    source, workdir = f"gs://{BUCKET}/corpus", f"gs://{BUCKET}/run"
    cache = tmp_path / "cache"  # the gs:// corpus is copied here
    first = run(train_cmd(workdir, cache, source), emulator)
    try:
        t0, saved = time.time(), f"{BUCKET}/run/checkpoints/{N}.sizes.json"  # written once step N is complete
        while not fs().exists(saved):
            assert first.poll() is None and time.time() - t0 < 120, first.communicate()[1][-3000:]
            time.sleep(0.05)  # each look is a request the emulator serves; 20 steps and 2 saves remain
            fs().invalidate_cache()
        first.kill()
        assert first.wait() == -signal.SIGKILL  # killed before the end
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    assert fs().exists(f"{BUCKET}/run/train.lock")  # left by the killed run
    # The uninterrupted reference: conftest's run of the same command on local disk (shared with test_checkpoint.py).
    straight = tiny_straight_run
    resumed = finish(run(train_cmd(workdir, cache, source), emulator))
    assert f"took over the lock of train.py pid {first.pid} on host {socket.gethostname()}: that process has " \
           "ended" in resumed
    start = int(re.search(r"resumed from step (\d+)", resumed).group(1))
    assert N <= start < STEPS and start % N == 0
    assert f"done: step {STEPS}, loss " in resumed and f"{workdir}: metrics.jsonl, loss.png" in resumed

    want_params = final_params(straight)
    jax.tree_util.tree_map(np.testing.assert_array_equal, final_params(workdir), want_params)
    records = [json.loads(line) for line in fs().cat_file(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once
    want = losses(straight)
    assert all(r["loss"] == want[r["step"]] for r in records)
    names = fs().ls(f"{BUCKET}/run", detail=False)
    assert f"{BUCKET}/run/train.lock" not in names and fs().info(f"{BUCKET}/run/loss.png")["size"] > 1000
    assert fs().ls(f"{BUCKET}/run/tensorboard")  # tensorboardX's own writer for gs://

    # generate.py --ckpt gs://... --prompt "To be" --max_new_tokens 4 --temperature 0
    config, params = load_model(ckpt=workdir)
    prompt = get_tokenizer().encode("To be")
    assert len(generate(config, params, [prompt], max_new_tokens=4, temperature=0.0, eos_id=EOT_ID)[0]) == 4
    # python -m gpt2_jax.export --ckpt gs://.../checkpoints/STEPS --out OUT
    out = tmp_path / "hf"
    export_checkpoint(f"{workdir}/checkpoints/{STEPS}", str(out))
    _, params = load_hf_gpt2(str(out))
    np.testing.assert_array_equal(params["wte"]["embedding"][:50257], want_params["wte"]["embedding"][:50257])


def test_the_workdir_lock_is_an_object_refused_while_held_and_taken_over_when_stale(emulator, monkeypatch):
    from gpt2_jax.training import workdir_lock

    workdir = f"gs://{BUCKET}/locked"
    held = workdir_lock.acquire(workdir, say=lambda line: None)
    try:
        with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"^workdir {workdir} is in use by another train.py "
                           rf"\(host {socket.gethostname()}, pid {os.getpid()}, since "):
            workdir_lock.acquire(workdir)
    finally:
        held.release()
    assert not fs().exists(f"{BUCKET}/locked/train.lock")
    # A lock from another host whose heartbeat stopped long ago (the object's time is old: judged by age).
    dead = {"host": "tpu-vm-7", "pid": 4242, "started": 0}
    fs().pipe_file(f"{BUCKET}/locked/train.lock", json.dumps(dead).encode())
    said = []
    real_mtime = workdir_lock.storage.mtime
    monkeypatch.setattr(workdir_lock.storage, "mtime", lambda path: real_mtime(path) - workdir_lock.STALE_AFTER_S - 60)
    lock = workdir_lock.acquire(workdir, say=said.append)
    assert len(said) == 1 and said[0].startswith(
        f"workdir {workdir}: took over the lock of train.py pid 4242 on host tpu-vm-7: its heartbeat stopped 36")
    assert json.loads(fs().cat_file(f"{BUCKET}/locked/train.lock"))["pid"] == os.getpid()
    lock.release()


def test_init_from_a_hugging_face_folder_in_a_bucket(emulator, tmp_path):
    from gpt2_jax.training import init_from as init_from_lib

    fixture = os.path.join(ROOT, "tests", "fixtures", "hf_tiny")
    for name in ("config.json", "model.safetensors"):
        fs().put_file(os.path.join(fixture, name), f"{BUCKET}/hf_tiny/{name}")
    source = init_from_lib.open_source(f"gs://{BUCKET}/hf_tiny", cache_dir=str(tmp_path))
    assert source.kind == init_from_lib.HF and source.path == str(tmp_path / "gcs" / BUCKET / "hf_tiny")
    with open(os.path.join(fixture, "config.json")) as f:
        assert source.model_config.n_embd == json.load(f)["n_embd"]
    again = os.path.getmtime(os.path.join(source.path, "model.safetensors"))
    init_from_lib.open_source(f"gs://{BUCKET}/hf_tiny", cache_dir=str(tmp_path))  # unchanged: not fetched again
    assert os.path.getmtime(os.path.join(source.path, "model.safetensors")) == again
    with pytest.raises(ValueError, match=r"^config.model.init_from='gs://[^']+/nothing': no such folder"):
        init_from_lib.open_source(f"gs://{BUCKET}/nothing", cache_dir=str(tmp_path))


def test_a_gs_path_without_gcsfs_is_one_error_line(tmp_path):
    script = ("import sys; sys.modules['gcsfs'] = None; sys.argv[0] = 'train.py'; "
              "exec(compile(open('train.py').read(), 'train.py', 'exec'))")
    out = subprocess.run([sys.executable, "-c", script, "--config", "configs/tiny.py", "--workdir", "gs://b/run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == ['error: --workdir=gs://b/run: gs:// paths need the gcsfs package: '
                                       'pip install -e ".[gcs]"']
