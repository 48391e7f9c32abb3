"""Prepares a corpus of any size once: text -> GPT-2 tokens -> llm.c uint16 shards + manifest, in parallel,
resumable.

    python -m gpt2_jax.data.prepare SOURCE... --out DIR [--shard_tokens N] [--val_tokens N] [--workers N]
        [--text_field text] [--hf_dataset NAME --hf_config C --hf_split S] [--max_tokens N]

SOURCE is anything ``config.data.source`` takes (sources.py: a .txt / .jsonl / .parquet file, a folder or glob
of them, a ``datasets`` save_to_disk folder, llm.c .bin shards, ``builtin:shakespeare``); ``--hf_dataset``
streams a Hugging Face dataset after them. Every document is preceded by ``<|endoftext|>``, an empty one too.

The token stream, in source order, is cut into ``val_000000.bin``, ... (its first ``--val_tokens`` tokens) and
``train_000000.bin``, ... (the rest), every shard ``--shard_tokens`` long except each kind's last, beside a
``manifest.json``. ``config.data.source=DIR`` reads the training shards, ``val_source='DIR/val_*.bin'`` the
validation ones.

Worker processes tokenise batches of documents with tiktoken's batch encoding; the main process reads the
sources, hands batches out in order and writes shards, so the output does not depend on ``--workers``.
A shard is written whole under a temporary name and renamed, then ``prepare_progress.json`` records where
the stream stood at its end (source unit, item in it, tokens of that item already written). Run after an
interruption (Ctrl-C, SIGKILL, a lost VM), the same command skips what is written and ends with the same
bytes as an uninterrupted run; a different command refuses the folder rather than mix two corpora in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gpt2_jax import cli
from gpt2_jax.data import corpus, pipeline, sources, tables
from gpt2_jax.data import tokenizer as tokenizer_lib

FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's FineWeb shards
DEFAULT_VAL_TOKENS = 10_485_760  # modded-nanogpt's validation budget for GPT-2 124M


@dataclasses.dataclass(frozen=True)
class Options:
    sources: tuple[str, ...]
    out: str
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_tokens: int = DEFAULT_VAL_TOKENS
    workers: int = os.cpu_count() or 1
    text_field: str = "text"
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    max_tokens: int | None = None

    def check(self) -> None:
        if not self.sources and not self.hf_dataset:
            raise ValueError("nothing to prepare: give one or more SOURCE arguments or --hf_dataset")
        if not 0 < self.shard_tokens < 2**31:
            raise ValueError(f"--shard_tokens must be in [1, 2**31), got {self.shard_tokens}")
        if self.val_tokens < 0:
            raise ValueError(f"--val_tokens must be >= 0, got {self.val_tokens}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"--max_tokens must be >= 1, got {self.max_tokens}")


# ----------------------------------------------------------------------------------------------------------
# Sources as units (pipeline.py): files, saved datasets, a hub stream.


def _units(options: Options) -> tuple[list[pipeline.Unit], list[dict]]:
    """The units to read in order, and how the manifest describes the sources."""
    units, described = [], []
    for source in options.sources:
        src = sources.resolve_source(source)
        described.append({"source": src.key, "kind": src.kind,
                          "files": [{"path": str(f), "size": f.stat().st_size} for f in src.files]})
        for unit in sources.units(src):
            if src.kind == "llmc":
                units.append(pipeline.Unit(functools.partial(pipeline.bin_items, unit)))
                continue
            if unit.suffix == ".parquet":
                next(tables.parquet_documents(unit, options.text_field), None)  # its field and footer, now
            documents = functools.partial(sources.unit_documents, src, unit, sources.PIECE_CHARS,
                                          text_field=options.text_field, split=options.hf_split)
            units.append(pipeline.Unit(lambda documents=documents: pipeline.text_items(documents())))
    if options.hf_dataset:
        hub = functools.partial(tables.hub_documents, options.hf_dataset, options.hf_config, options.hf_split,
                                options.text_field)
        described.append({"hf_dataset": options.hf_dataset, "config": options.hf_config, "split": options.hf_split})
        units.append(pipeline.Unit(lambda: pipeline.text_items(hub())))
    return units, described



# ----------------------------------------------------------------------------------------------------------
# The output folder, and whether it is ours to write.


class OutputFolder:
    """Every read and write of ``--out`` goes through here, so that another store (a gs:// bucket) is one
    class away; today a local folder."""

    def __init__(self, path: str):
        if "://" in path:
            raise ValueError(f"--out {path}: only local folders are supported for now; prepare into a local "
                             "disk, then copy the folder (gcloud storage cp -r DIR gs://BUCKET/DIR)")
        self.path = Path(path).expanduser().absolute()

    def __str__(self) -> str:
        return str(self.path)

    def names(self) -> list[str]:
        if not self.path.exists():
            return []
        if not self.path.is_dir():
            raise NotADirectoryError(f"--out {self.path} is a file, not a folder")
        return sorted(os.listdir(self.path))

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads((self.path / name).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            raise ValueError(f"{self.path / name} is not valid JSON; delete the folder to start over") from None

    def write_atomic(self, name: str, chunks: list[bytes]) -> None:
        """Writes under a temporary name, then renames: a reader (or a resumed run) sees all of it or none."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.writelines(chunks)
        os.replace(tmp, self.path / name)

    def write_json(self, name: str, obj: dict) -> None:
        self.write_atomic(name, [(json.dumps(obj, indent=1) + "\n").encode()])

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)


def _identity(options: Options, described: list[dict]) -> dict:
    """What decides the output's bytes (not --workers): a folder holding another identity is not ours."""
    return {
        "format": sources.PREPARED_FORMAT,
        "format_version": FORMAT_VERSION,
        "sources": described,
        "text_field": options.text_field,
        "hf_split": options.hf_split,
        "shard_tokens": options.shard_tokens,
        "val_tokens": options.val_tokens,
        "max_tokens": options.max_tokens,
        "tokenizer": corpus.tokenizer_info("text"),
        "document_separator": {"token": tokenizer_lib.EOT_TOKEN, "id": tokenizer_lib.EOT_ID, "placement": "before"},
    }


def _claim(out: OutputFolder, identity: dict) -> pipeline.Progress | dict:
    """Where to start in ``out``: a pipeline.Progress (new or resumed), or the manifest of a finished same corpus."""
    names = out.names()
    for name in names:
        if name.startswith(".") and name.endswith(".tmp"):  # a shard an interrupted run was writing
            out.remove(name)
    for name, done in ((sources.PREPARED_MANIFEST, True), (sources.PREPARE_PROGRESS, False)):
        if name not in names:
            continue
        found = out.read_json(name)
        theirs = found.get("identity") if isinstance(found, dict) else None
        if theirs != identity:
            what = ", ".join(s.get("source") or s.get("hf_dataset") or "?" for s in (theirs or {}).get("sources", []))
            raise ValueError(
                f"--out {out} holds another corpus ({what or 'not written by this command'}; or the same sources "
                "with other options): choose another folder, or delete this one to start over"
            )
        if done:
            return found
        return pipeline.Progress(shards=found["shards"], position=found["position"], resume=tuple(found["resume"]),
                         documents=found["documents"], skipped=found["skipped"])
    foreign = [n for n in names if n.endswith((".bin", ".json"))]
    if foreign:
        raise ValueError(f"--out {out} already holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''} "
                         "from something else: prepare into a new or empty folder")
    return pipeline.Progress(shards=[])


# ----------------------------------------------------------------------------------------------------------
# The run.


def prepare(options: Options, *, say: Callable[[str], None] = print) -> dict:
    """Prepares (or finishes preparing) ``options.out``; returns its manifest."""
    from tqdm import tqdm

    options.check()
    out = OutputFolder(options.out)
    units, described = _units(options)
    identity = _identity(options, described)
    progress = _claim(out, identity)
    if isinstance(progress, dict):
        say(f"done already: {out} holds this corpus ({progress['total_tokens']:,} tokens)")
        return progress

    def save():
        out.write_json(sources.PREPARE_PROGRESS, {"identity": identity, **dataclasses.asdict(progress)})

    save()  # claims the folder before any work
    if progress.position:
        say(f"resuming {out}: {len(progress.shards)} shards ({progress.position:,} tokens) written already")
    sink = pipeline.ShardSink(out.write_atomic, progress, shard_tokens=options.shard_tokens,
                              val_tokens=options.val_tokens, max_tokens=options.max_tokens, save_progress=save)
    began = time.perf_counter()
    bar = tqdm(total=options.max_tokens, initial=progress.position, unit="tok", unit_scale=True,
               dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    # spawn, not fork: the main process may already run pyarrow's threads
    pool = multiprocessing.get_context("spawn").Pool(options.workers, initializer=pipeline.start_worker)
    try:
        pipeline.pump(units, sink, pool, options.workers, bar)
    finally:
        pool.terminate()
        bar.close()
    full = sink.full
    sink.close()
    elapsed = time.perf_counter() - began
    skipped = progress.skipped if full else sink.skipped
    documents = progress.documents + sink.begun_document if full else sink.documents
    val = [s for s in progress.shards if s["file"].startswith("val_")]
    train = [s for s in progress.shards if s["file"].startswith("train_")]
    if not train:
        raise ValueError(f"the sources hold {progress.position:,} tokens, no more than --val_tokens="
                         f"{options.val_tokens:,}: none are left for training; lower --val_tokens")
    if skipped:
        print(f"warning: skipped {skipped:,} documents whose text is null or not valid UTF-8", file=sys.stderr)
    manifest = {
        "format": sources.PREPARED_FORMAT,
        "identity": identity,
        "train_shards": train,
        "val_shards": val,
        "documents": documents,
        "skipped_documents": skipped,
        "train_tokens": sum(s["tokens"] for s in train),
        "val_tokens": sum(s["tokens"] for s in val),
        "total_tokens": progress.position,
        "created": time.time(),
    }
    out.write_json(sources.PREPARED_MANIFEST, manifest)
    out.remove(sources.PREPARE_PROGRESS)
    say(f"done: {out}: {manifest['train_tokens']:,} train tokens in {len(train)} shards, {manifest['val_tokens']:,} "
        f"val tokens in {len(val)}, {documents:,} documents ({progress.position / max(elapsed, 1e-9):,.0f} tokens/s)")
    return manifest


# ----------------------------------------------------------------------------------------------------------
# The command line.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line and exit 2, as every command here
        cli.fail(message)


def parse_args(argv: list[str]) -> Options:
    p = _Parser(prog="python -m gpt2_jax.data.prepare", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="text / jsonl / parquet files, folders or globs, save_to_disk folders, llm.c shards")
    p.add_argument("--out", required=True, help="the output folder (created; resumed if it holds this corpus)")
    p.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--val_tokens", type=int, default=DEFAULT_VAL_TOKENS,
                   help="the stream's first N tokens become val_*.bin (0: no validation shards)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokeniser processes (default: all cores)")
    p.add_argument("--text_field", default="text", help="the field holding the text in parquet / datasets rows")
    p.add_argument("--hf_dataset", help="a Hugging Face dataset to stream after the SOURCEs (HuggingFaceFW/fineweb)")
    p.add_argument("--hf_config", help="its configuration, e.g. sample-10BT")
    p.add_argument("--hf_split", default="train", help="its split (also picks a split of a saved DatasetDict)")
    p.add_argument("--max_tokens", type=int, help="stop after the stream's first N tokens")
    a = p.parse_args(argv)
    return Options(sources=tuple(a.sources), out=a.out, shard_tokens=a.shard_tokens, val_tokens=a.val_tokens,
                   workers=a.workers, text_field=a.text_field, hf_dataset=a.hf_dataset, hf_config=a.hf_config,
                   hf_split=a.hf_split, max_tokens=a.max_tokens)


def main(argv: list[str] | None = None) -> None:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        prepare(options)
    except (ValueError, OSError) as e:
        cli.fail(cli.describe(e))
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
