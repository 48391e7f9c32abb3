"""Documents from tables: parquet files, a folder written by ``datasets.Dataset.save_to_disk``, and a Hugging
Face hub dataset streamed by the ``datasets`` library. One row is one document; its text is one field
(``text`` unless told otherwise).

These read through ``pyarrow`` / ``datasets``, optional dependencies (``pip install -e ".[data]"``), imported
only when a table is read, so text and jsonl corpora never need them.

A row whose text is null or not valid UTF-8 comes out as ``None``: the caller counts and skips it (a
crawled corpus of millions of rows should not stop at one bad row), where a bad .txt / .jsonl file, which a
person wrote and can fix, is an error.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

DATA_EXTRA = 'pip install -e ".[data]"'
_BATCH_ROWS = 1024  # rows per Arrow batch: large enough to amortise, small in memory for long documents


def _require(module: str, why: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ValueError(f"{why} needs the package {package!r}, which is not installed: {DATA_EXTRA}") from None


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def saved_dataset_files(path: Path) -> list[Path]:
    """The Arrow files holding a saved dataset's rows (what its bytes are fingerprinted by)."""
    files = sorted(path.rglob("*.arrow"))
    if not files:
        raise ValueError(f"dataset folder {path} holds no .arrow files")
    return files


def _no_field(where: str, field: str, names: list[str]) -> ValueError:
    return ValueError(f"{where} has no field {field!r}; its fields are {', '.join(map(repr, names))} "
                      "(choose one with --text_field)")


def _texts(column, where: str) -> list[str | None]:
    """One Arrow column (string or binary) as Python strings; None for a null or non-UTF-8 value."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            return column.to_pylist()  # decodes and validates in C, the common case
        except UnicodeDecodeError:
            column = column.cast(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary())
    elif not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise ValueError(f"{where}: the text field holds {kind}, not text")
    texts = []
    for raw in column.to_pylist():
        try:
            texts.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
    return texts


def parquet_documents(path: Path, text_field: str) -> Iterator[str | None]:
    """The ``text_field`` of every row of one parquet file, in order."""
    _require("pyarrow", "reading parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable parquet file ({e})") from None
    names = reader.schema_arrow.names
    if text_field not in names:
        raise _no_field(str(path), text_field, names)
    if reader.metadata.num_rows == 0:
        raise ValueError(f"{path} is an empty parquet file (0 rows)")
    try:
        for batch in reader.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field]):
            yield from _texts(batch.column(0), str(path))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: corrupt parquet data ({e})") from None


def saved_dataset_documents(path: Path, text_field: str, split: str | None = None) -> Iterator[str | None]:
    """The ``text_field`` of every row of a ``save_to_disk`` folder (for a DatasetDict: ``split``, else
    ``train``, else its only split)."""
    datasets = _require("datasets", "reading a saved Hugging Face dataset")
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:  # FileNotFoundError, a json or Arrow error
        raise ValueError(f"{path} is not a readable saved dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        name = split or ("train" if "train" in ds else (names[0] if len(names) == 1 else None))
        if name not in ds:
            raise ValueError(f"{path} holds the splits {', '.join(map(repr, names))}; choose one with --hf_split")
        ds = ds[name]
    if text_field not in ds.column_names:
        raise _no_field(str(path), text_field, ds.column_names)
    ds = ds.select_columns([text_field]).with_format("arrow")
    for start in range(0, len(ds), _BATCH_ROWS):
        yield from _texts(ds[start: start + _BATCH_ROWS].column(0), str(path))


def hub_documents(name: str, config: str | None, split: str, text_field: str) -> Iterator[str | None]:
    """The ``text_field`` of every row of a Hugging Face dataset, streamed (nothing is downloaded whole).
    ``name`` may also be a local folder of data files, which ``datasets`` reads the same way."""
    datasets = _require("datasets", "--hf_dataset")
    where = f"--hf_dataset {name}"
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        batches = ds.iter(batch_size=_BATCH_ROWS)
        first = next(batches, None)
    except Exception as e:  # noqa: BLE001 - the hub, the network and the builders raise many kinds
        raise ValueError(f"{where}: {type(e).__name__}: {e}") from None
    if first is None:
        raise ValueError(f"{where} (split {split!r}) holds no rows")
    if text_field not in first:
        raise _no_field(where, text_field, list(first))

    def rows(batch):
        return [text if isinstance(text, str) else None for text in batch[text_field]]

    yield from rows(first)
    for batch in batches:
        yield from rows(batch)
