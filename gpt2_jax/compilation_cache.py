"""What makes a second start fast: JAX's persistent compilation cache for the entry points
(train.py, generate.py, evaluate), and for generate.py a cache of its traced programs.

Compiling the train step or the decode loop takes seconds; a second run of the same program
loads the executable from disk instead. The cache folder sits beside the corpus cache
(`~/.cache/gpt2_jax/jax_cache` by default). `GPT2_JAX_COMPILATION_CACHE` overrides it: a folder,
or `off` to disable. A `JAX_COMPILATION_CACHE_DIR` the user set wins over both.

JAX still traces and lowers a program to find it in that cache: about a second for each of generate.py's
prefill and decode programs in a fresh process. `enable(traced_programs=True)` also keeps those
programs traced and lowered (`jax.export`) in `<folder>/programs`, keyed by the function, its
static arguments, the argument types, the jax version and settings and the source of this
package, so that `compile_traced` skips the tracing. Only single-device programs are kept.

Within one process, `executable` keeps the last compiled programs in memory, keyed by their static
settings and argument shapes, and says how long a miss took to compile (so callers can report
throughput without compilation in it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from typing import Any

ENV = "GPT2_JAX_COMPILATION_CACHE"
DEFAULT_FOLDER = "~/.cache/gpt2_jax/jax_cache"
_OFF = ("", "0", "off", "false", "none")
_programs_folder: str | None = None  # set by enable(traced_programs=True)
_EXECUTABLES: dict[tuple, Any] = {}
_MAX_EXECUTABLES = 64


def folder(default: str = DEFAULT_FOLDER) -> str | None:
    """The cache folder this process should use (None = disabled), from the environment or `default`."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    chosen = os.environ.get(ENV, default)
    if chosen.strip().lower() in _OFF:
        return None
    return os.path.abspath(os.path.expanduser(chosen))


def enable(default: str = DEFAULT_FOLDER, *, traced_programs: bool = False) -> str | None:
    """Turns the persistent cache on for this process (before the first compilation); returns the folder.

    `traced_programs=True` also keeps programs compiled through `compile_traced` traced on disk.
    """
    import jax

    global _programs_folder
    path = folder(default)
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program: on a CPU even the sub-second compiles add up over a run's many programs.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if traced_programs:
        _programs_folder = os.path.join(path, "programs")
    return path


def compile_traced(fn: Callable, args: tuple, *, key: Any, donate_argnums: tuple[int, ...] = ()) -> Callable:
    """`jax.jit(fn, donate_argnums=...).lower(*args).compile()`, as a function of args like fn's.

    `key` names fn and whatever it closes over (static arguments, a config). With traced programs
    enabled, the traced and lowered program is loaded from disk when it was kept before, and kept
    otherwise; the executable itself comes from JAX's persistent cache as usual.
    """
    import jax

    leaves, in_tree = jax.tree_util.tree_flatten(args)
    one_device = all(isinstance(x, jax.Array) and len(x.sharding.device_set) == 1 for x in leaves)
    if _programs_folder is None or not one_device:
        return jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    # Donation by leaf: the kept program takes the arguments flattened.
    donated = tuple(i for i, owner in enumerate(_leaf_owners(args)) if owner in donate_argnums)
    path = os.path.join(_programs_folder, _program_key(key, in_tree, leaves, donate_argnums) + ".pkl")
    compiled = None
    exported, out_tree = _load(path)
    if exported is not None:
        try:
            compiled = jax.jit(exported.call, donate_argnums=donated).lower(*leaves).compile()
        except Exception:  # noqa: BLE001 - kept by an incompatible jax: trace it again
            compiled = None
    if compiled is None:
        box = {}

        def flat(*flat_args):
            out = fn(*jax.tree_util.tree_unflatten(in_tree, flat_args))
            out_leaves, box["out_tree"] = jax.tree_util.tree_flatten(out)
            return out_leaves

        exported = jax.export.export(jax.jit(flat))(*leaves)
        out_tree = box["out_tree"]
        _save(path, exported, out_tree)
        compiled = jax.jit(exported.call, donate_argnums=donated).lower(*leaves).compile()

    def call(*call_args):
        return jax.tree_util.tree_unflatten(out_tree, compiled(*jax.tree_util.tree_leaves(call_args)))

    return call


def executable(fn: Callable, static: tuple, *args, donate_argnums: tuple[int, ...] = ()) -> tuple[Any, float]:
    """(the executable of fn(*static, *args) for these argument shapes, seconds spent compiling it now).

    Kept in memory (the last _MAX_EXECUTABLES), and compiled through `compile_traced`, so that
    traced programs are kept on disk where enabled.
    """
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (fn.__name__, static, treedef, donate_argnums, tuple((jax.typeof(x), x.sharding) for x in leaves))
    if key in _EXECUTABLES:
        return _EXECUTABLES[key], 0.0
    start = time.perf_counter()

    def bound(*a):
        return fn(*static, *a)

    compiled = compile_traced(bound, args, key=(fn.__module__, fn.__qualname__, static), donate_argnums=donate_argnums)
    if len(_EXECUTABLES) >= _MAX_EXECUTABLES:
        _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
    _EXECUTABLES[key] = compiled
    return compiled, time.perf_counter() - start


def _leaf_owners(args: tuple) -> list[int]:
    """For each leaf of args, the index of the argument it belongs to."""
    import jax

    return [i for i, arg in enumerate(args) for _ in jax.tree_util.tree_leaves(arg)]


def _program_key(key: Any, in_tree: Any, leaves: list, donate_argnums: tuple[int, ...]) -> str:
    import jax

    signature = [(str(jax.typeof(x)), str(next(iter(x.sharding.device_set)).platform)) for x in leaves]
    settings = sorted((k, repr(v)) for k, v in jax.config.values.items() if k != "jax_compilation_cache_dir")
    text = repr((key, str(in_tree), signature, donate_argnums, jax.__version__, settings, _source_digest()))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """A digest of this package's source: a kept program never outlives the code that traced it."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for folder_path, _, files in sorted(os.walk(root)):
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(folder_path, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


def _load(path: str) -> tuple[Any, Any]:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception:  # noqa: BLE001 - missing, partly written by a killed run, or from another version
        return None, None


def _save(path: str, exported: Any, out_tree: Any) -> None:
    """Writes atomically; the backward-pass hook (a closure, not picklable) is not needed to call it."""
    try:
        blob = pickle.dumps((dataclasses.replace(exported, _get_vjp=None), out_tree))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
            f.write(blob)
        os.replace(f.name, path)
    except Exception:  # noqa: BLE001 - a cache that cannot be written is only slower
        pass
