"""The parallel tokenising pipeline behind ``python -m gpt2_jax.data.prepare`` (prepare.py).

A corpus is a list of units (a file, a saved dataset, a streamed dataset), each a deterministic stream of
items: a text piece ``(starts a document, text)``, a skipped row ``(False, None)``, or a chunk of ready tokens
(a uint16 array, from llm.c shards). The main process reads the items in order and hands batches of pieces to
worker processes, which tokenise them with tiktoken's batch encoding; their results are taken back in the
order the batches were made, so the token stream does not depend on the number of workers. ``ShardSink``
cuts the stream into shards and, after each, records the resume point: (unit, item in it, tokens of that item
already written).
"""

from __future__ import annotations

import collections
import dataclasses
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from gpt2_jax.data import sources
from gpt2_jax.data import tokenizer as tokenizer_lib
from gpt2_jax.data.shards import ShardWriter, read_llmc_shard

_BATCH_CHARS = 1 << 20  # text per worker task: ~0.1 s of tokenising, a few MB in flight per worker
_BIN_CHUNK = 1 << 22  # tokens per item when a source is already llm.c shards
SKIPPED, PIECE, FIRST_PIECE = 0, 1, 2  # what an item is, for the writer's counts


@dataclasses.dataclass(frozen=True)
class Unit:
    items: Callable[[], Iterator]  # a new iterator over the unit's items, from its start


def text_items(documents) -> Iterator[tuple[bool, str | None]]:
    """A unit's documents (each an iterable of text blocks, or None for a skipped row) as items."""
    for document in documents:
        if document is None:
            yield False, None
            continue
        first = True
        for piece in sources.safe_pieces(document, sources.PIECE_CHARS):  # a long document in several tasks
            yield first, piece
            first = False
        if first:
            yield True, ""  # an empty document still gets its <|endoftext|>


def bin_items(path: Path) -> Iterator[np.ndarray]:
    tokens = read_llmc_shard(path)
    for start in range(0, len(tokens), _BIN_CHUNK):
        yield np.array(tokens[start: start + _BIN_CHUNK])


# ----------------------------------------------------------------------------------------------------------
# Workers: tokenise one batch of pieces into one uint16 array.

_encoding = None


def start_worker() -> None:
    global _encoding
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _encoding = tokenizer_lib.get_tokenizer()


_EOT = np.array([tokenizer_lib.EOT_ID], dtype=np.uint32)


def encode(texts: list[str], starts: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, tokens per piece): each piece's ids, preceded by <|endoftext|> where it starts a document.

    `encode_to_numpy` with no special tokens allowed or refused is `encode_ordinary` (a special token's
    text is encoded as ordinary text) without building Python int lists: ~30% less CPU per token here
    than `encode_ordinary_batch` plus a list-to-array copy (BENCHMARKS.md, "Corpus preparation").
    """
    parts: list[np.ndarray] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, (text, start) in enumerate(zip(texts, starts)):
        ids = _encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        if start:
            parts.append(_EOT)
        parts.append(ids)
        lengths[i] = len(ids) + start
    tokens = np.concatenate(parts) if parts else np.empty(0, np.uint32)
    return tokens.astype(np.uint16), lengths


# ----------------------------------------------------------------------------------------------------------
# The writer: fills shards in stream order and records, after each, where to resume.


@dataclasses.dataclass
class Progress:
    shards: list[dict]  # {"file", "tokens", "sha256"} of each finished shard, val then train
    position: int = 0  # tokens written
    resume: tuple[int, int, int] = (0, 0, 0)  # (unit, item in it, tokens of that item already written)
    documents: int = 0  # documents begun before the resume item
    skipped: int = 0  # rows skipped (null or not UTF-8) before the resume item


class ShardSink:
    """Takes batches' tokens in stream order: the first ``val_tokens`` into val_*.bin shards, the rest into
    train_*.bin, each ``shard_tokens`` long but the last of its kind, all of it cut at ``max_tokens``."""

    def __init__(self, save_file: Callable[[str, list[bytes]], None], progress: Progress, *, shard_tokens: int,
                 val_tokens: int, max_tokens: int | None, save_progress: Callable[[], None]):
        self.progress = progress
        self._shard_tokens, self._val_tokens, self._max_tokens = shard_tokens, val_tokens, max_tokens
        self._save_progress = save_progress
        self._writer = ShardWriter(save_file, shard_tokens, name=self._name)
        self._writer.shards = progress.shards
        self._drop = progress.resume[2]  # the resume item's tokens already in a shard
        self.documents, self.skipped = progress.documents, progress.skipped  # in the batches consumed
        self.begun_document = False  # the stream ends inside a document's tokens (cut by max_tokens)

    @property
    def full(self) -> bool:
        return self._max_tokens is not None and self.progress.position >= self._max_tokens

    def _shard_start(self) -> int:
        return self.progress.position - self._writer.filled

    def _name(self, _: int) -> str:
        kind = "val" if self._shard_start() < self._val_tokens else "train"
        return f"{kind}_{sum(s['file'].startswith(kind) for s in self.progress.shards):06d}.bin"

    def _capacity(self) -> int:
        start = self._shard_start()
        room = min(self._shard_tokens, self._val_tokens - start) if start < self._val_tokens else self._shard_tokens
        return room if self._max_tokens is None else min(room, self._max_tokens - start)

    def write(self, tokens: np.ndarray, lengths: np.ndarray, where: list[tuple[int, int, int]]) -> None:
        """``where``: (unit, item, SKIPPED | PIECE | FIRST_PIECE) per item; ``lengths``: the tokens of each
        item, or of each item but the skipped rows."""
        kinds = np.array([k for _, _, k in where], dtype=np.int8)
        if len(lengths) != len(kinds):  # the workers saw no skipped rows: they hold no tokens
            lengths, given = np.zeros(len(kinds), dtype=np.int64), lengths
            lengths[kinds != SKIPPED] = given
        ends = self.progress.position - self._drop + np.cumsum(lengths)  # stream position after each item
        tokens = tokens[self._drop:]
        self._drop = 0
        while tokens.size and not self.full:
            take = self._writer.fill(tokens[: self._capacity() - self._writer.filled])
            self.progress.position += take
            tokens = tokens[take:]
            if self._writer.filled == self._capacity():
                self._resume_at(ends, lengths, kinds, where)
                self._writer.finish()
                self._save_progress()
        self.documents += int(np.count_nonzero(kinds == FIRST_PIECE))
        self.skipped += int(np.count_nonzero(kinds == SKIPPED))

    def _resume_at(self, ends, lengths, kinds, where) -> None:
        """Moves the resume point to the stream's current position, which lies in this batch."""
        p = self.progress
        i = int(np.searchsorted(ends, p.position, side="right"))  # the first item not wholly written
        p.documents = self.documents + int(np.count_nonzero(kinds[:i] == FIRST_PIECE))
        p.skipped = self.skipped + int(np.count_nonzero(kinds[:i] == SKIPPED))
        if i == len(where):
            unit, item, _ = where[-1]
            p.resume = (unit, item + 1, 0)  # past a unit's last item is the next unit's first
            self.begun_document = False
        else:
            unit, item, _ = where[i]
            p.resume = (unit, item, int(p.position - (ends[i] - lengths[i])))
            self.begun_document = bool(p.resume[2] and kinds[i] == FIRST_PIECE)

    def close(self) -> None:
        self._writer.finish()


# ----------------------------------------------------------------------------------------------------------
# The run.


class _Ready:
    """A result computed in the main process (ready tokens of a .bin source), queued like a worker's."""

    def __init__(self, value):
        self._value = value

    def get(self):
        return self._value


def pump(units: list[Unit], sink: ShardSink, pool, workers: int, bar) -> None:
    """Reads the units from the resume point on, keeps the workers busy, and writes their results in order."""
    pending = collections.deque()
    texts, starts, where, chars = [], [], [], 0

    def flush():
        nonlocal texts, starts, where, chars
        if where:
            pending.append((where, pool.apply_async(encode, (texts, starts))))
        texts, starts, where, chars = [], [], [], 0

    def drain(keep: int):
        while len(pending) > keep and not sink.full:
            batch_where, result = pending.popleft()
            tokens, lengths = result.get()
            before = sink.progress.position
            sink.write(tokens, lengths, batch_where)
            bar.update(sink.progress.position - before)
            bar.set_postfix(docs=sink.documents, refresh=False)

    first_unit, first_item, _ = sink.progress.resume
    for u in range(first_unit, len(units)):
        for k, item in enumerate(units[u].items()):
            if u == first_unit and k < first_item:
                continue  # written before an interruption
            if isinstance(item, np.ndarray):
                flush()
                pending.append(([(u, k, PIECE)], _Ready((item, np.array([len(item)])))))
            else:
                start, text = item
                where.append((u, k, SKIPPED if text is None else FIRST_PIECE if start else PIECE))
                if text is not None:
                    texts.append(text)
                    starts.append(start)
                    chars += len(text)
                if chars >= _BATCH_CHARS:
                    flush()
            if len(pending) > 2 * workers:  # a bounded queue: enough to keep every worker busy
                drain(workers)
                if sink.full:
                    return
    flush()
    drain(0)
