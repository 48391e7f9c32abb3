"""Token storage: llm.c ``.bin`` shards (a 1 KiB header, then uint16 tokens) and ``TokenArray``, a token
stream made of several shards that slices lazily, so a 10B-token corpus splits into train / validation
without being read."""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# llm.c token shards: a header of 256 little-endian int32 (magic, version, token count, zeros), then the
# tokens as little-endian uint16.

LLMC_MAGIC = 20240520
LLMC_VERSION = 1
_LLMC_HEADER_INTS = 256
_LLMC_HEADER_BYTES = _LLMC_HEADER_INTS * 4


def _llmc_header(num_tokens: int) -> bytes:
    header = np.zeros(_LLMC_HEADER_INTS, dtype="<i4")
    header[:3] = (LLMC_MAGIC, LLMC_VERSION, num_tokens)
    return header.tobytes()


def write_llmc_shard(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray) -> None:
    """Writes ``tokens`` (ids in [0, 65535]) as one llm.c shard (format version 1, uint16 tokens)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"llm.c shards hold uint16 token ids; got dtype {tokens.dtype} with values outside [0, 65535]")
    if tokens.size >= 2**31:
        raise ValueError(f"{tokens.size} tokens do not fit in one llm.c shard (int32 count); split them")
    with open(path, "wb") as f:
        f.write(_llmc_header(tokens.size))
        f.write(tokens.astype("<u2").tobytes())


class ShardWriter:
    """Cuts a token stream into llm.c shards: each is built in a buffer and handed whole, header and tokens,
    to ``save(name, chunks)`` (so a shard on disk is never half written when save renames into place)."""

    def __init__(self, save: Callable[[str, list[bytes]], None], shard_tokens: int, name: Callable[[int], str]):
        self._save, self._name = save, name  # name(index of the shard among those this writer wrote)
        self._buffer = np.empty(shard_tokens, dtype=np.uint16)  # pages are touched only as they fill
        self.filled = 0  # tokens in the shard being built
        self.shards: list[dict] = []  # {"file", "tokens", "sha256"} of each shard written

    def fill(self, tokens: np.ndarray) -> int:
        """Copies as many of ``tokens`` as the current shard has room for; returns how many."""
        take = min(len(tokens), len(self._buffer) - self.filled)
        self._buffer[self.filled: self.filled + take] = tokens[:take]
        self.filled += take
        return take

    def write(self, tokens: np.ndarray) -> None:
        """Appends ``tokens``, saving each shard as it reaches ``shard_tokens``."""
        while len(tokens):
            tokens = tokens[self.fill(tokens):]
            if self.filled == len(self._buffer):
                self.finish()

    def finish(self) -> None:
        """Saves the shard being built, if it holds any tokens, whatever its length."""
        if not self.filled:
            return
        chunks = [_llmc_header(self.filled), self._buffer[: self.filled].astype("<u2", copy=False).tobytes()]
        name = self._name(len(self.shards))
        self._save(name, chunks)
        digest = hashlib.sha256(chunks[0])
        digest.update(chunks[1])
        self.shards.append({"file": name, "tokens": self.filled, "sha256": digest.hexdigest()})
        self.filled = 0


def read_llmc_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of one llm.c shard as a read-only uint16 memmap, after validating its header and size."""
    path = Path(path)
    size = path.stat().st_size
    if size < _LLMC_HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is too short for the {_LLMC_HEADER_BYTES}-byte llm.c header")
    magic, version, count = (int(x) for x in np.fromfile(path, dtype="<i4", count=3))
    if magic != LLMC_MAGIC:
        raise ValueError(f"{path}: wrong magic number {magic}, expected {LLMC_MAGIC} (not an llm.c token shard)")
    if version != LLMC_VERSION:
        raise ValueError(
            f"{path}: unsupported llm.c shard version {version}; only version {LLMC_VERSION} "
            "(uint16 GPT-2 token ids) is supported"
        )
    body = size - _LLMC_HEADER_BYTES
    if count < 0 or body != 2 * count:
        raise ValueError(
            f"{path}: header says {count} tokens ({2 * count} bytes) but the body holds {body} bytes "
            f"({'truncated' if body < 2 * count else 'trailing data'})"
        )
    if count == 0:
        return np.empty(0, dtype=np.uint16)  # an empty file region cannot be memory-mapped
    return np.memmap(path, dtype="<u2", mode="r", offset=_LLMC_HEADER_BYTES, shape=(int(count),))


# ----------------------------------------------------------------------------------------------------------
# A token stream stored as several shards.


class TokenArray:
    """A read-only 1-D uint16 token sequence made of consecutive pieces (usually shard memmaps).

    Slicing with a step of 1 is lazy (returns another ``TokenArray``), so a 10B-token corpus can be split
    into train / validation without reading it; ``np.asarray`` materialises a slice (and crosses shard
    boundaries), integer indexing returns one token.
    """

    dtype = np.dtype(np.uint16)
    ndim = 1

    def __init__(self, parts: Sequence[np.ndarray]):
        self._parts = [p for p in parts if len(p)]
        for p in self._parts:
            if p.ndim != 1 or p.dtype != self.dtype:
                raise ValueError(f"TokenArray pieces must be 1-D uint16, got {p.dtype} with shape {p.shape}")
        # _starts[i] is the offset of piece i in the stream; the last entry is the total length.
        self._starts = [0]
        for p in self._parts:
            self._starts.append(self._starts[-1] + len(p))

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def num_parts(self) -> int:
        return len(self._parts)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError(f"TokenArray supports only contiguous slices, got step {step}")
            return self._view(start, max(start, stop))
        index = int(key)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"token index {key} out of range for {n} tokens")
        part = bisect.bisect_right(self._starts, index) - 1
        return self._parts[part][index - self._starts[part]]

    def _view(self, start: int, stop: int) -> TokenArray:
        pieces = []
        first = bisect.bisect_right(self._starts, start) - 1
        for i in range(max(first, 0), len(self._parts)):
            lo, hi = self._starts[i], self._starts[i + 1]
            if lo >= stop:
                break
            pieces.append(self._parts[i][max(start, lo) - lo : min(stop, hi) - lo])
        return TokenArray(pieces)

    def __array__(self, dtype=None, copy=None):
        if not self._parts:
            out = np.empty(0, dtype=self.dtype)
        elif len(self._parts) == 1:
            out = np.asarray(self._parts[0]).view(np.ndarray)
        else:
            out = np.concatenate(self._parts)
        return out.astype(dtype, copy=False) if dtype is not None else out

    def __repr__(self) -> str:
        return f"TokenArray({len(self)} tokens in {len(self._parts)} parts)"


def split_tokens(tokens, val_fraction: float):
    """``(train, val)``: the last ``val_fraction`` of the stream is held out for validation.

    Both halves are lazy slices. Whether each is long enough for its batches is checked by
    ``check_enough_tokens`` (``make_batch_iterator`` calls it).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = int(len(tokens) * val_fraction)
    num_train = len(tokens) - num_val
    return tokens[:num_train], tokens[num_train:]
