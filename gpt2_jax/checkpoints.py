"""Reading gpt2-jax checkpoints: one reader for training (resume), generate, evaluate and export.

Layout of `WORKDIR/checkpoints/<step>/` (one orbax CheckpointManager step):
  params/       the model parameters (restorable alone, e.g. by generate.py)
  train_state/  step, optimizer state and RNG
  data/         the data iterator's position (JSON)
  meta/         the model config, the full training config and the step (JSON)
and `WORKDIR/checkpoints/<step>.sizes.json`, written once a save is finalised: the size of every
file, so a truncated file is noticed before orbax reads garbage.

Every read goes through `read(manager, step, **items)`, and every choice of step through
`restore_newest_usable`: from the newest step back, skipping (and naming) any that is incomplete,
truncated or unreadable. A step folder named on purpose is that step or an error. `load_model` is
the command lines' front door: a checkpoint or a Hugging Face folder, local or gs://.
Writing (async saves, keep-N, moving bad steps aside) is gpt2_jax/training/checkpoint.py's.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from gpt2_jax import storage
from gpt2_jax.model.config import ModelConfig

ITEMS = ("params", "train_state", "data", "meta")
DTYPES = ("float32", "bfloat16")  # what load_model casts to
HF_COPIES = "~/.cache/gpt2_jax"  # where a gs:// Hugging Face folder is copied (storage.local_copy)


def _sizes_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"{step}.sizes.json")


_COMMITTED = "commit_success.txt"  # orbax's mark of a finished save, where it cannot rename (Cloud Storage)


def _steps(directory: str) -> list[int]:
    """The steps whose folders are in `directory` (on Cloud Storage: whose saves finished)."""
    names = [n for n in storage.listdir(directory) if n.isdigit()]
    if storage.is_gcs(directory):
        names = [n for n in names if storage.exists(os.path.join(directory, n, _COMMITTED))]
    return [int(n) for n in names]


def verify_step(directory: str, step: int) -> str | None:
    """None if the step folder matches its recorded file sizes, else what is wrong."""
    step_dir = os.path.join(directory, str(step))
    sizes_file = _sizes_path(directory, step)
    if not storage.exists(sizes_file):
        return None  # finalised by orbax but killed before the sizes were written: orbax's own check only
    try:
        want = json.loads(storage.read_bytes(sizes_file))
    except (OSError, ValueError) as e:
        return f"its size record {sizes_file} is unreadable ({e})"
    have = storage.file_sizes(step_dir)
    for rel, size in want.items():
        if rel not in have:
            return f"file {rel} is missing"
        if have[rel] != size:
            return f"file {rel} has {have[rel]} bytes, {size} were written"
    return None


def incomplete_steps(directory: str) -> list[str]:
    """Names of temporary step folders left by a save that never finished."""
    if not storage.isdir(directory):
        return []
    names = storage.listdir(directory)
    if storage.is_gcs(directory):
        return sorted(n for n in names if n.isdigit() and not storage.exists(os.path.join(directory, n, _COMMITTED)))
    return sorted(n for n in names if re.search(r"orbax-checkpoint-tmp", n))


def _failure(error: Exception) -> str:
    text = str(error).splitlines()[0][:300] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def _restore_checked(directory: str, step: int, restore: Callable[[int], Any]) -> tuple[Any, str | None]:
    """(restore(step), None), or (None, what is wrong) if the step's files or its restore are bad."""
    problem = verify_step(directory, step)
    if problem is not None:
        return None, problem
    try:
        return restore(step), None
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for bad bytes
        return None, _failure(e)


def set_aside(directory: str, step: int) -> str:
    """Renames the step folder (and its size record) to `<step>.corrupt-<UTC time>`; returns the new path.

    Orbax sees only folders named by a number, so the step is free to be saved again. (On Cloud
    Storage a copy, then a deletion: a run killed meanwhile leaves the step to be set aside again.)
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = os.path.join(directory, f"{step}.corrupt-{stamp}")
    n = 1
    while storage.exists(target):  # set aside twice within a second
        n += 1
        target = os.path.join(directory, f"{step}.corrupt-{stamp}-{n}")
    storage.rename(os.path.join(directory, str(step)), target)
    if storage.exists(_sizes_path(directory, step)):
        storage.rename(_sizes_path(directory, step), target + ".sizes.json")
    return target


def restore_newest_usable(directory: str, steps: list[int], restore: Callable[[int], Any], *,
                          move_aside: bool = False) -> tuple[Any, list[str]]:
    """Tries `restore(step)` from the newest step back; returns (result or None, problems met).

    A step whose files do not match their recorded sizes, or whose restore raises, is skipped in
    favour of the previous one; once a step restores, one line on stderr names what was skipped,
    why, and the step used. With `move_aside` the skipped steps are also moved aside (`set_aside`),
    but only once an older step has restored: when none does, nothing is touched.
    """
    problems, skipped = [], []
    for step in sorted(steps, reverse=True):
        result, problem = _restore_checked(directory, step, restore)
        if problem is None:
            if problems:
                done = "skipped"
                if move_aside:
                    done = "moved aside to " + ", ".join(os.path.basename(set_aside(directory, s)) for s in skipped)
                print(f"checkpoint {'; '.join(problems)}: unusable, {done}; using step {step}",
                      file=sys.stderr, flush=True)
            return result, problems
        problems.append(f"step {step} ({problem})")
        skipped.append(step)
    return None, problems


def read_newest_meta(directory: str) -> dict | None:
    """The meta (model, config, schedule, step) of the newest checkpoint in `directory` whose meta
    reads, or None if there is none. Creates nothing; a step that turns out unusable is named later,
    by the restore."""
    import orbax.checkpoint as ocp

    if not storage.isdir(directory):
        return None
    steps = sorted(_steps(directory), reverse=True)
    if not steps:
        return None
    with reader(directory) as manager:
        for step in steps:
            if verify_step(directory, step) is not None:
                continue  # a truncated step: the restore names it and walks back past it
            try:
                return read(manager, step, meta=ocp.args.JsonRestore())["meta"]
            except Exception:  # noqa: BLE001 - an unreadable step: the restore walks back past it
                continue
    return None


def find_checkpoint_step_dir(path: str) -> tuple[str, int | None]:
    """Resolves a user's --ckpt path: a workdir, its checkpoints/ folder, or one step folder.

    Returns (checkpoints directory, step or None for "newest good one").
    """
    path = storage.absolute(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if not storage.isdir(path):
        raise ValueError(f"checkpoint path {path} is a file, not a training workdir or checkpoint folder")
    if storage.isdir(os.path.join(path, "meta")) and storage.isdir(os.path.join(path, "params")):
        parent, name = os.path.split(path)
        if name.isdigit():
            return parent, int(name)
        raise ValueError(f"{path} looks like a checkpoint but its folder name is not a step number")
    if storage.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = [s for s in _steps(path) if storage.isdir(os.path.join(path, str(s), "params"))]
    if not steps:
        if not storage.listdir(path):
            raise FileNotFoundError(f"checkpoint folder {path} is empty")
        raise ValueError(
            f"{path} is not a checkpoint: expected a training workdir (with checkpoints/), "
            "a checkpoints/ folder or one step folder (with params/ and meta/)"
        )
    return path, None


def newest_meta(path: str) -> tuple[str, int, dict]:
    """(checkpoints directory, step, meta) of the checkpoint a --ckpt-style `path` names: its step
    folder, or the newest step of a workdir whose files check out and whose meta reads."""
    import orbax.checkpoint as ocp

    directory, step = find_checkpoint_step_dir(path)
    steps = [step] if step is not None else _steps(directory)
    with reader(directory) as mngr:
        result, problems = restore_newest_usable(
            directory, steps, lambda s: (s, read(mngr, s, meta=ocp.args.JsonRestore())["meta"])
        )
    if result is None:
        raise ValueError(f"no usable checkpoint in {directory}: " + "; ".join(problems))
    return directory, *result


def saved_model(workdir: str) -> dict | None:
    """The model config (a dict) of a training workdir's newest usable checkpoint; None if it has none."""
    directory = os.path.join(storage.absolute(workdir), "checkpoints")
    if not storage.isdir(directory) or not _steps(directory):
        return None
    return newest_meta(directory)[2]["model"]


def restore_params_at(directory: str, step: int, abstract_params: Any) -> Any:
    """The parameters of checkpoint `step` in `directory`, restored straight into the shardings of
    `abstract_params` (jax.ShapeDtypeStruct leaves with .sharding), from whatever mesh wrote them."""
    import orbax.checkpoint as ocp

    with reader(directory) as mngr:
        return read(mngr, step, params=ocp.args.StandardRestore(abstract_params))["params"]


def reader(directory: str):  # -> orbax.checkpoint.CheckpointManager
    """An orbax manager over `directory` that reads and creates nothing (read_only=True would log
    three warnings per use)."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(create=False))


def read(manager, step: int, **items: Any) -> dict:
    """The named items of checkpoint `step` (each given its orbax restore argument): every read of a
    checkpoint goes through here."""
    import orbax.checkpoint as ocp

    return manager.restore(step, args=ocp.args.Composite(**items))


def restore_params(path: str, *, dtype: str | None = None) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params) from a checkpoint, rebuilt from the checkpoint alone (no config file).

    `path` is a training workdir (newest good checkpoint), its checkpoints/ folder or a step folder.
    Params land on the default device, replicated; `dtype` casts them (e.g. 'bfloat16').
    """
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from etils import epath

    directory, step = find_checkpoint_step_dir(path)
    with reader(directory) as mngr:

        def restore(s: int) -> tuple[ModelConfig, Any]:
            meta = read(mngr, s, meta=ocp.args.JsonRestore())["meta"]
            # The attention kernel is this machine's choice, not the model's: a run saved with 'splash'
            # on a TPU is read back with 'auto' (same numerics).
            config = ModelConfig.from_dict({**meta["model"], "attention": "auto"})
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            # Shapes and dtypes as saved: tracing the model's init for them was a visible part of generate.py's start.
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(s) / "params")
            shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                            saved.tree)
            params = read(mngr, s, params=ocp.args.StandardRestore(shapes))["params"]
            if dtype is not None:
                params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(dtype)), params)
                config = config.replace(dtype=dtype, param_dtype=dtype)
            return config, params

        if step is not None:  # a step folder named on purpose: that step or an error, no fallback
            result, problem = _restore_checked(directory, step, restore)
            if problem is not None:
                raise ValueError(f"checkpoint {os.path.join(directory, str(step))} is unusable: {problem}")
            return result
        result, problems = restore_newest_usable(directory, _steps(directory), restore)
    if result is None:
        raise ValueError(f"no usable checkpoint in {directory}: " + "; ".join(problems))
    return result


def check_source(ckpt: str | None, hf: str | None) -> None:
    """ValueError / FileNotFoundError unless exactly one model source is given and it is a folder with
    something in it (cheap, no jax: call it before slow work)."""
    if (ckpt is None) == (hf is None):
        raise ValueError("give exactly one of --ckpt DIR (a training checkpoint) or --hf DIR (a Hugging Face folder)")
    path = ckpt if ckpt is not None else hf
    flag = "--ckpt" if ckpt is not None else "--hf"
    storage.check(path, flag)
    if not storage.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such folder")
    if not storage.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a folder")
    if not storage.listdir(path):
        raise FileNotFoundError(f"{flag} {path}: the folder is empty (nothing to load)")


def load_model(*, ckpt: str | None = None, hf: str | None = None, dtype: str = "float32") -> tuple[ModelConfig, Any]:
    """(ModelConfig, params) from a training checkpoint (`ckpt`) or a Hugging Face folder (`hf`).

    Exactly one source must be given. `dtype='bfloat16'` casts the weights and the model's compute
    to bfloat16. Raises ValueError / FileNotFoundError with a message fit for a command line.
    """
    import jax
    import jax.numpy as jnp

    check_source(ckpt, hf)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {DTYPES}")
    if ckpt is not None:
        config, params = restore_params(ckpt)
    else:
        from gpt2_jax.model.hf import load_hf_gpt2

        config, params = load_hf_gpt2(storage.local_copy(hf, HF_COPIES))
    if dtype != config.param_dtype or dtype != config.dtype:
        config = config.replace(dtype=dtype, param_dtype=dtype)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), params)
    return config, params
