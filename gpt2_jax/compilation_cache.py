"""JAX's persistent compilation cache for the entry points (train.py, generate.py, evaluate).

Compiling the train step or the decode loop takes seconds; a second run of the same program
loads the executable from disk instead. The cache folder sits beside the corpus cache
(`~/.cache/gpt2_jax/jax_cache` by default). `GPT2_JAX_COMPILATION_CACHE` overrides it: a folder,
or `off` to disable. A `JAX_COMPILATION_CACHE_DIR` the user set wins over both.
"""

from __future__ import annotations

import os

ENV = "GPT2_JAX_COMPILATION_CACHE"
DEFAULT_FOLDER = "~/.cache/gpt2_jax/jax_cache"
_OFF = ("", "0", "off", "false", "none")


def folder(default: str = DEFAULT_FOLDER) -> str | None:
    """The cache folder this process should use (None = disabled), from the environment or `default`."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    chosen = os.environ.get(ENV, default)
    if chosen.strip().lower() in _OFF:
        return None
    return os.path.abspath(os.path.expanduser(chosen))


def enable(default: str = DEFAULT_FOLDER) -> str | None:
    """Turns the persistent cache on for this process (before the first compilation); returns the folder."""
    import jax

    path = folder(default)
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program: on a CPU even the sub-second compiles add up over a run's many programs.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
