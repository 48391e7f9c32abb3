"""Helpers shared by several test files (pytest puts tests/ on sys.path: `from helpers import ...`)."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import abstract_params
from gpt2_jax.training import checkpoint as ckpt_lib


def subprocess_env(devices: int, *, optimized: bool = False, **extra: str) -> dict[str, str]:
    """This process's environment for a subprocess with `devices` simulated CPU devices; conftest's
    XLA flags and the shared compilation cache carry over. `optimized=True` restores LLVM's default
    -O2, for runs whose time goes into running rather than compiling: train.py's softmax and head
    over the real 50,257-token vocabulary are slow unoptimised (helpers.tiny_train_cmd's 30 steps:
    8.7 s at -O0, 6.7 s at -O2 with its programs cached)."""
    drop = ("--xla_force_host_platform",) + (("--xla_backend_optimization_level",) if optimized else ())
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(drop)]
    return dict(os.environ, XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *flags]),
                **extra)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN_STEPS = 30  # the checkpoint and bucket tests' runs, and conftest's uninterrupted one


def tiny_train_cmd(workdir, cache, checkpoint_every: int, *extra: str) -> list[str]:
    """train.py on configs/tiny.py with a 16-token context, TINY_RUN_STEPS steps and no evaluation:
    the one command of the runs that conftest's `tiny_straight_run` is the uninterrupted reference of
    (checkpoint_every and the corpus's location do not change the losses or the programs)."""
    return [
        sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
        "--workdir", str(workdir), f"--config.train.num_steps={TINY_RUN_STEPS}",
        f"--config.train.checkpoint_every={checkpoint_every}", "--config.train.eval_every=0",
        "--config.model.block_size=16", f"--config.data.cache_dir={cache}", *extra,
    ]


def require(module: str):
    """Imports a reference package (torch, transformers); skips the test where it is missing."""
    if os.environ.get("CI"):
        return __import__(module)  # in CI the reference must be there: never skip silently
    return pytest.importorskip(module)


def random_params(cfg: ModelConfig, *, seed: int = 0, std: float):
    """Weights N(0, std), biases 0, LayerNorm scales 1 (numpy: no initialiser to compile)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "bias"):
            return jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, jnp.float32)
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_params(cfg)))


def make_checkpoint(workdir, cfg: ModelConfig, params, step: int = 3) -> str:
    """A training checkpoint of `params` at `step` in `workdir` (no optimizer state), as train.py writes it."""
    from gpt2_jax.training.step import TrainState

    checkpointer = ckpt_lib.Checkpointer(str(workdir))
    state = TrainState(step=jnp.int32(step), params=params, opt_state={}, rng=jax.random.PRNGKey(0))
    checkpointer.save(step, state, {}, {"model": cfg.to_dict()})
    checkpointer.close()
    return str(workdir)


def losses(workdir) -> dict[int, float]:
    """step -> loss, the latest record of each step (a resumed run logs some steps again)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                out[r["step"]] = r["loss"]
    return out


def final_params(workdir):
    """The newest good checkpoint's parameters in `workdir`, as numpy arrays."""
    _, params = ckpt_lib.restore_params(str(workdir))
    return jax.tree_util.tree_map(np.asarray, params)
