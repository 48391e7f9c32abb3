"""Local paths and Cloud Storage (`gs://bucket/path`) behind the few file operations a run needs.

On Cloud TPU VMs checkpoints and data live in buckets that every host of a pod reads, so --workdir,
--ckpt, config.data.source / val_source and config.model.init_from take gs:// paths. Orbax writes
and reads checkpoints there itself (tensorstore and etils.epath); everything else that touches a
workdir or a source goes through this module: a local path through os, exactly as before, a gs://
path through gcsfs (the filesystem etils.epath uses for gs://; `pip install -e ".[gcs]"`).

Cloud Storage is not a disk, and the callers work around what it lacks:
  - no folders: a "folder" is the objects whose names start with it; `makedirs` does nothing, and a
    folder exists while something is in it;
  - no append and no rename: an object is written whole and replaces the old one at once (a reader
    sees the old or the new bytes, never half); `rename` copies, then deletes (not atomic);
  - no free-space figure: `free_bytes` is None, and the check before a save is skipped.
Sources that libraries read as local files (text, jsonl, token shards, a Hugging Face folder) are
copied once into a local cache (`local_copy`) and read from there.
"""

from __future__ import annotations

import os
import shutil
import uuid

GCS = "gs://"
INSTALL = 'pip install -e ".[gcs]"'


def is_gcs(path: str | os.PathLike | None) -> bool:
    return path is not None and os.fspath(path).startswith(GCS)


def check(path: str, label: str) -> None:
    """ValueError (one line, naming `label`) if `path` is a gs:// path this machine cannot use."""
    if not is_gcs(path):
        return
    if not path[len(GCS):].split("/", 1)[0]:
        raise ValueError(f"{label}={path}: a Cloud Storage path is gs://BUCKET/PATH")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        raise ValueError(f"{label}={path}: gs:// paths need the gcsfs package: {INSTALL}") from None


def _fs():
    """The gcsfs filesystem, the same instance etils.epath (and so orbax) uses: what one deletes, the
    other no longer lists."""
    import fsspec

    return fsspec.filesystem("gcs", finalize_on_close=True)


def _fresh(path: str):
    """The filesystem, with what it remembers of `path`'s listing forgotten: orbax writes arrays through
    tensorstore, which gcsfs does not see."""
    fs = _fs()
    fs.invalidate_cache(path)
    return fs


def absolute(path: str) -> str:
    """A local path made absolute (~ expanded); a gs:// path as given, without a trailing slash."""
    path = os.fspath(path)
    if is_gcs(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def exists(path: str) -> bool:
    return _fresh(path).exists(path) if is_gcs(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _fresh(path).isdir(path) if is_gcs(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _fresh(path).isfile(path) if is_gcs(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """The names in a folder (on Cloud Storage none, rather than FileNotFoundError, for a folder with
    nothing in it: the two are one there)."""
    if not is_gcs(path):
        return os.listdir(path)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in _fresh(path).ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return [n for n in names if n]


def makedirs(path: str) -> None:
    if not is_gcs(path):  # Cloud Storage has no folders to create
        os.makedirs(path, exist_ok=True)


def mtime(path: str) -> float:
    """When `path` was last written (seconds since the epoch; an object's time is the server's)."""
    if not is_gcs(path):
        return os.stat(path).st_mtime
    return _fresh(path).info(path)["mtime"].timestamp()


def read_bytes(path: str) -> bytes:
    if is_gcs(path):
        return _fs().cat_file(path)
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_bytes(path: str, data: bytes) -> None:
    """Replaces `path` whole: a reader (or a kill) sees the old bytes or the new, never part of them.
    Locally a temporary file, synced, renamed over it; on Cloud Storage one upload."""
    if is_gcs(path):
        _fs().pipe_file(path, data)
        return
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_gcs(path: str, data: bytes) -> bool:
    """Writes the object `path` unless it exists; True if this call created it.

    The upload carries Cloud Storage's "only if absent" precondition (ifGenerationMatch=0), so of
    two runs creating it at once one fails. A service that ignores preconditions (some emulators)
    is caught by the look before and the read back after.
    """
    fs = _fresh(path)
    if fs.exists(path):
        return False
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return fs.cat_file(path) == data


def remove(path: str) -> None:
    """Removes a file (FileNotFoundError if there is none)."""
    if is_gcs(path):
        _fresh(path).rm_file(path)
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    """Removes a folder and everything in it, if it exists."""
    if not is_gcs(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs = _fresh(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def rename(src: str, dst: str) -> None:
    """Moves a file or folder to the new name `dst` (which must not exist). On Cloud Storage: a copy of
    each object, then the deletion of the originals."""
    if not is_gcs(src):
        os.rename(src, dst)
        return
    fs = _fresh(src)
    if fs.isfile(src):
        fs.copy(src, dst)
        fs.rm_file(src)
        return
    for rel in file_sizes(src):
        fs.copy(f"{src}/{rel}", f"{dst}/{rel}")
    fs.rm(src, recursive=True)


def file_sizes(folder: str) -> dict[str, int]:
    """The size of every file below `folder`, by its path relative to it ('/'-separated)."""
    sizes = {}
    if is_gcs(folder):
        prefix = folder.rstrip("/")[len(GCS):] + "/"
        for name, info in _fresh(folder).find(folder, detail=True).items():
            if info.get("type") == "file" and name.startswith(prefix):
                sizes[name[len(prefix):]] = int(info["size"])
        return sizes
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return sizes


def free_bytes(path: str) -> int | None:
    """Free space where `path` is; None on Cloud Storage, which has no such figure."""
    return None if is_gcs(path) else shutil.disk_usage(path).free


def local_copy(path: str, cache_dir: str) -> str:
    """A local path holding what the gs:// `path` names (a file, a folder's files, or a glob of
    files), under `cache_dir/gcs/BUCKET/...`; a local `path` as given.

    Objects already copied, with the same size and time, are not fetched again, so a prepared corpus
    made from the copy stays valid. FileNotFoundError if `path` names nothing.
    """
    if not is_gcs(path):
        return path
    fs = _fresh(path)
    root = os.path.join(os.path.expanduser(cache_dir), "gcs")
    local = os.path.join(root, path[len(GCS):].rstrip("/"))
    if fs.isfile(path):
        files = [path[len(GCS):]]
    elif fs.isdir(path):  # not recursive, as for a local folder
        files = [name for name, info in fs.find(path, maxdepth=1, detail=True).items() if info.get("type") == "file"]
    else:
        files = fs.glob(path)  # a pattern (gs://bucket/data/*.bin), or nothing
        if not files:
            raise FileNotFoundError(f"{path} does not exist")
    for name in files:
        info = fs.info(GCS + name)
        target = os.path.join(root, name)
        when = info["mtime"].timestamp()
        if os.path.isfile(target) and os.path.getsize(target) == info["size"] and os.path.getmtime(target) == when:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
        fs.get_file(GCS + name, tmp)
        os.utime(tmp, (when, when))
        os.replace(tmp, target)
    return local
