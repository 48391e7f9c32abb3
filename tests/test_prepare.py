"""`python -m gpt2_jax.data.prepare`: parquet / saved datasets / a streamed dataset -> llm.c shards whose tokens
are tiktoken's plus one <|endoftext|> per document, the same for any --workers, the same after a Ctrl-C or a
SIGKILL and a rerun, read by train.py; bad input as one `error:` line and exit 2."""

import glob
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import require, subprocess_env

from gpt2_jax.data import prepare as prepare_lib
from gpt2_jax.data.corpus import check_source
from gpt2_jax.data.shards import read_llmc_shard
from gpt2_jax.data.tokenizer import EOT_ID, get_tokenizer

pa = require("pyarrow")  # the `data` extra, in the `test` extra too: CI runs these
import pyarrow.parquet as pq  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD, VAL = 4096, 3000  # small shards, so that the corpus spans several and a boundary falls inside documents


def documents() -> list[str]:
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "naïve", "café", "jalapeño", "über", "1984", "x=y+2;", "don't"]
    docs = [
        "", "a", " ", "\n\n", "Hello world", "line one\r\nline two\r\n", "<|endoftext|> is plain text here",
        "日本語のテキストです。中文文本，还有标点。한국어 문장입니다.",
        "🙂👍🏽🇺🇳 family: 👨‍👩‍👧‍👦 emoji only 🤖",
        "مرحبا بالعالم، هذا نص عربي. שלום עולם, זה טקסט בעברית.",
        "Ελληνικά и русский текст, हिन्दी पाठ",
        "中" * 3000,  # one long pre-tokeniser piece
        " ".join(rng.choice(words, 150_000)),  # ~750K characters: cut into several tasks (corpus.PIECE_CHARS)
    ]
    docs += [" ".join(rng.choice(words, n)) for n in rng.integers(1, 400, 120)]
    return docs


def expected_stream(docs) -> np.ndarray:
    enc = get_tokenizer()
    return np.concatenate([np.array([EOT_ID, *enc.encode_ordinary(d)], dtype=np.uint16) for d in docs])


def write_parquet(folder, docs, *, files=3):
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(docs), files + 1).astype(int)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        table = pa.table({"id": list(range(lo, hi)), "text": docs[lo:hi]})
        pq.write_table(table, folder / f"part_{i:02d}.parquet", row_group_size=7 + 13 * i)
    return folder


def stream_of(out) -> np.ndarray:
    files = sorted(glob.glob(f"{out}/val_*.bin")) + sorted(glob.glob(f"{out}/train_*.bin"))
    return np.concatenate([np.asarray(read_llmc_shard(f)) for f in files])


def folder_bytes(out) -> dict[str, bytes]:
    return {os.path.basename(f): open(f, "rb").read() for f in sorted(glob.glob(f"{out}/*.bin"))}


def run_cli(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "gpt2_jax.data.prepare", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=subprocess_env(1, PYTHONPATH=ROOT), **kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The documents, their parquet files, and the folder prepared from them with 2 workers."""
    tmp = tmp_path_factory.mktemp("prepare")
    docs = documents()
    parquet = write_parquet(tmp / "parquet", docs)
    out = tmp / "out"
    prepare_lib.prepare(prepare_lib.Options(sources=(str(parquet),), out=str(out), shard_tokens=SHARD,
                                            val_tokens=VAL, workers=2), say=lambda line: None)
    return docs, parquet, out


def test_shards_hold_tiktokens_tokens_plus_one_eot_per_document(corpus):
    docs, _, out = corpus
    expected = expected_stream(docs)
    assert np.array_equal(stream_of(out), expected)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == len(docs) and manifest["skipped_documents"] == 0
    assert manifest["total_tokens"] == len(expected) == manifest["train_tokens"] + VAL
    sizes = [s["tokens"] for s in manifest["train_shards"]]
    assert len(sizes) > 20 and set(sizes[:-1]) == {SHARD} and 0 < sizes[-1] <= SHARD
    assert [s["tokens"] for s in manifest["val_shards"]] == [VAL]
    assert not (out / "prepare_progress.json").exists()


def test_output_does_not_depend_on_workers(corpus, tmp_path):
    _, parquet, out = corpus
    one = tmp_path / "one"
    prepare_lib.prepare(prepare_lib.Options(sources=(str(parquet),), out=str(one), shard_tokens=SHARD,
                                            val_tokens=VAL, workers=1), say=lambda line: None)
    assert folder_bytes(one) == folder_bytes(out)


# Stops the run inside its shard writes: `--stop NAME:SIGNAL:WHEN`, WHEN `mid` (half of NAME's temporary file
# written) or `after` (NAME renamed into place, the progress file not yet updated).
_INTERRUPTER = """
import os, signal, sys
from gpt2_jax.data import prepare
name, sig, when = sys.argv.pop(1).split(":")
write = prepare.OutputFolder.write_atomic
def write_atomic(self, file, chunks):
    if file == name and when == "mid":
        with open(self.path / f".{file}.tmp", "wb") as f:
            f.write(b"".join(chunks)[:3000])
        os.kill(os.getpid(), getattr(signal, sig))
    write(self, file, chunks)
    if file == name and when == "after":
        os.kill(os.getpid(), getattr(signal, sig))
prepare.OutputFolder.write_atomic = write_atomic
prepare.main()
"""


def test_interrupted_runs_resume_to_the_same_bytes(corpus, tmp_path):
    _, parquet, out = corpus
    resumed = tmp_path / "resumed"
    args = [parquet, "--out", resumed, "--shard_tokens", SHARD, "--val_tokens", VAL, "--workers", 2]

    def interrupted(stop):
        return subprocess.run([sys.executable, "-c", _INTERRUPTER, stop, *map(str, args)], capture_output=True,
                              text=True, timeout=120, cwd=ROOT, env=subprocess_env(1, PYTHONPATH=ROOT))

    first = interrupted("train_000003.bin:SIGINT:mid")  # Ctrl-C
    assert first.returncode == 130 and "run the same command again" in first.stderr, first.stderr[-2000:]
    assert json.loads((resumed / "prepare_progress.json").read_text())["resume"][2] > 0  # inside a document
    with pytest.raises(ValueError, match="still being prepared"):  # train.py's check of config.data.source
        check_source(str(resumed))
    second = interrupted("train_000009.bin:SIGKILL:mid")
    assert second.returncode == -9 and "resuming" in second.stdout and (resumed / ".train_000009.bin.tmp").exists()
    third = interrupted("train_000014.bin:SIGKILL:after")
    assert third.returncode == -9
    last = run_cli(args)
    assert last.returncode == 0, last.stderr[-2000:]
    assert folder_bytes(resumed) == folder_bytes(out)
    assert not [f for f in os.listdir(resumed) if f.startswith(".")]
    assert json.loads((resumed / "manifest.json").read_text())["documents"] == len(documents())
    again = run_cli(args)  # the same command on a finished folder: nothing to do
    assert again.returncode == 0 and "done already" in again.stdout


def test_saved_dataset_and_streamed_dataset_give_the_same_stream(corpus, tmp_path, monkeypatch):
    datasets = require("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs, parquet, out = corpus
    expected = stream_of(out)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": docs}),
                          "test": datasets.Dataset.from_dict({"body": ["x"]})}).save_to_disk(str(saved))
    prepare_lib.prepare(prepare_lib.Options(sources=(str(saved),), out=str(tmp_path / "a"), shard_tokens=SHARD,
                                            val_tokens=VAL, workers=2, text_field="body"), say=lambda line: None)
    assert np.array_equal(stream_of(tmp_path / "a"), expected)
    # --hf_dataset runs datasets.load_dataset(..., streaming=True): the hub is out of reach here, a local
    # folder of parquet files goes through the same call.
    prepare_lib.prepare(prepare_lib.Options(sources=(), out=str(tmp_path / "b"), hf_dataset=str(parquet),
                                            shard_tokens=SHARD, val_tokens=VAL, workers=2), say=lambda line: None)
    assert np.array_equal(stream_of(tmp_path / "b"), expected)


def test_train_py_trains_on_the_prepared_folder(corpus, tmp_path):
    _, _, out = corpus
    workdir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
           "--workdir", str(workdir), "--config.train.num_steps=3", "--config.train.eval_every=3",
           "--config.train.eval_steps=1", "--config.train.checkpoint_every=0", "--config.mesh.data=1",
           f"--config.data.source={out}", f"--config.data.val_source={out}/val_*.bin",
           f"--config.data.cache_dir={tmp_path / 'cache'}"]
    run = subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and any("val_loss" in r for r in records)


# ----------------------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit 2.


def fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        prepare_lib.main([*map(str, argv), "--workers", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def test_bad_parquet_files(tmp_path, capsys):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    assert "empty parquet file" in fails(capsys, tmp_path / "empty.parquet", "--out", tmp_path / "o")
    (tmp_path / "zero.parquet").write_bytes(b"")
    assert "not a readable parquet file" in fails(capsys, tmp_path / "zero.parquet", "--out", tmp_path / "o")
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"body": ["one", "two"], "url": ["u1", "u2"]}), good)
    assert "no field 'text'; its fields are 'body', 'url'" in fails(capsys, good, "--out", tmp_path / "o")
    (tmp_path / "corrupt.parquet").write_bytes(good.read_bytes()[:40] + b"\0" * 30 + good.read_bytes()[70:])
    assert "parquet" in fails(capsys, tmp_path / "corrupt.parquet", "--text_field", "body", "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_rows_that_are_not_utf8_are_counted_and_skipped(tmp_path, capsys):
    raw = pa.array([b"good one", b"bad \xff\xfe here", None, "caf\u00e9".encode()], pa.binary())
    text = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # a string column holding invalid UTF-8
    pq.write_table(pa.table({"text": text}), tmp_path / "mixed.parquet")
    prepare_lib.main([str(tmp_path / "mixed.parquet"), "--out", str(tmp_path / "o"), "--val_tokens", "0",
                      "--workers", "1"])
    assert "warning: skipped 2 documents whose text is null or not valid UTF-8" in capsys.readouterr().err
    assert np.array_equal(stream_of(tmp_path / "o"), expected_stream(["good one", "café"]))


def test_an_output_folder_of_another_corpus_is_refused(corpus, tmp_path, capsys):
    _, parquet, out = corpus
    before = folder_bytes(out)
    message = fails(capsys, parquet, "--out", out, "--shard_tokens", SHARD * 2, "--val_tokens", VAL)
    assert "holds another corpus" in message
    (tmp_path / "llmc").mkdir()
    (tmp_path / "llmc" / "fineweb_train_000001.bin").write_bytes(b"\0" * 1024)
    assert "already holds fineweb_train_000001.bin" in fails(capsys, parquet, "--out", tmp_path / "llmc")
    assert folder_bytes(out) == before


def test_missing_data_extra_is_one_error_line(tmp_path):
    fake = tmp_path / "fake" / "pyarrow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no pyarrow here')\n")
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    run = subprocess.run([sys.executable, "-m", "gpt2_jax.data.prepare", str(tmp_path / "a.parquet"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=subprocess_env(1, PYTHONPATH=f"{tmp_path / 'fake'}{os.pathsep}{ROOT}"))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: reading parquet needs the package 'pyarrow', which is not installed: pip install -e \".[data]\"")
