"""A training run's pieces, built once from the config and shared by everything that needs them.

`build_run(model_config, train_cfg, mesh, num_steps)` validates the mesh against the model and the
batch, builds the schedule and the optimizer, and lays out the train state from abstract shapes:
`jax.eval_shape` of the init gives shapes, the logical axis names give shardings
(training/sharding.py). The trainer, the step builders (training/step.py), checkpoint restore and
preflight all take the same `Run`, so none of them builds an optimizer or checks a mesh again.

`create_train_state(run)` then creates every array directly in its shards with
`jax.jit(init, out_shardings=...)`: a large model is never whole on one device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from gpt2_jax.data.tokenizer import EOT_ID
from gpt2_jax.model import ModelConfig, abstract_params, init_params, platform
from gpt2_jax.model.attention import resolve_attention
from gpt2_jax.model.config import model_config_from
from gpt2_jax.training import sharding
from gpt2_jax.training.optim import make_optimizer, make_schedule
from gpt2_jax.training.run_config import TrainConfig, check_document_mask_flag


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], optimizer steps taken (skipped non-finite updates included)
    params: Any  # unboxed parameter tree, param_dtype (fp32 by default)
    opt_state: optax.OptState  # mirrors params leaf by leaf, and so shares their shardings
    rng: jax.Array  # uint32 [2]: root of the dropout keys, fold_in(rng, step) per step


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """What one training run is made of. Build it with `build_run` or `run_from_config`."""

    model_config: ModelConfig
    train_cfg: Any  # the config.train block (ml_collections.ConfigDict)
    mesh: Mesh  # or a jax.sharding.AbstractMesh (preflight for more devices than this machine has)
    num_steps: int  # the schedule's length
    schedule: optax.Schedule  # learning rate at each optimizer step
    tx: optax.GradientTransformation  # clipping + AdamW (or Muon + AdamW) on `schedule`
    abstract_state: TrainState  # jax.ShapeDtypeStruct leaves with .sharding: what a checkpoint restores into
    state_shardings: TrainState  # NamedSharding leaves: what jit takes as in / out shardings
    document_mask: bool = False  # config.data.document_mask: attention stays inside each document

    @property
    def batch_sharding(self) -> NamedSharding:
        return sharding.batch_sharding(self.mesh)

    def global_batch(self, local: dict[str, np.ndarray], global_batch_size: int) -> dict[str, jax.Array]:
        """Assembles each process's rows of a batch into global arrays sharded over the batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (global_batch_size,) + v.shape[1:])
                for k, v in local.items()}

    def init_fn(self) -> Callable[[jax.Array], TrainState]:
        """seed key -> a fresh TrainState: parameters and dropout root from split(key)."""
        return _init_fn(self.model_config, self.tx, sharding.batch_divisor(self.mesh))


def _init_fn(model_config: ModelConfig, tx: optax.GradientTransformation, batch: int) -> Callable:
    def init(seed_key: jax.Array) -> TrainState:
        params_rng, dropout_rng = jax.random.split(seed_key)
        params = init_params(model_config, params_rng, batch_size=batch)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=dropout_rng)

    return init


def _state_around(tx: optax.GradientTransformation) -> Callable:
    def init(params: Any, seed_key: jax.Array) -> TrainState:
        _, dropout_rng = jax.random.split(seed_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=dropout_rng)

    return init


def build_run(model_config: ModelConfig, train_cfg: Any, mesh: Mesh, num_steps: int, *,
              document_mask: bool = False) -> Run:
    """Validates, then builds the schedule, optimizer and state layout once; allocates nothing."""
    train_cfg = TrainConfig.of(train_cfg)  # config.train typed and checked once (run_config.py)
    check_document_mask(document_mask, model_config)
    sharding.validate_mesh_for(model_config, train_cfg, mesh)
    # An attention choice the mesh's platform cannot run fails here, by key.
    resolve_attention(model_config, platform.of_mesh(mesh).name)
    schedule = make_schedule(train_cfg, num_steps)
    tx = make_optimizer(train_cfg, schedule)
    shapes = jax.eval_shape(_init_fn(model_config, tx, sharding.batch_divisor(mesh)), jax.random.PRNGKey(0))
    param_shardings = sharding.logical_to_sharding(abstract_params(model_config), mesh)
    shardings = TrainState(
        step=sharding.replicated(mesh),
        params=param_shardings,
        opt_state=opt_state_shardings(shapes.opt_state, shapes.params, param_shardings, mesh),
        rng=sharding.replicated(mesh),
    )
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return Run(model_config, train_cfg, mesh, num_steps, schedule, tx, abstract, shardings, document_mask)


def check_document_mask(document_mask: Any, model_config: ModelConfig) -> None:
    """Raises ValueError naming config.data.document_mask when it is not a bool, or when the vocabulary
    has no `<|endoftext|>` to find documents by."""
    check_document_mask_flag(document_mask)
    if document_mask and model_config.vocab_size <= EOT_ID:
        raise ValueError(f"config.data.document_mask=True finds documents by <|endoftext|> ({EOT_ID}), "
                         f"which is outside vocab_size={model_config.vocab_size}")


def run_from_config(config: Any, mesh: Mesh, num_steps: int | None = None) -> Run:
    """`build_run` for a full training config (configs/*.py); num_steps defaults to config.train.num_steps."""
    steps = config.train.num_steps if num_steps is None else num_steps
    return build_run(model_config_from(config.model), config.train, mesh, steps,
                     document_mask=config.data.document_mask)


def create_train_state(run: Run, params: Any = None) -> TrainState:
    """A fresh state born sharded on the run's mesh, from PRNGKey(train_cfg.seed).

    With `params` (laid out as run.state_shardings.params, e.g. pretrained weights; donated) the
    state holds them, with step 0, a fresh optimizer state and the dropout root of a random init.
    """
    if params is not None:
        around = jax.jit(_state_around(run.tx), out_shardings=run.state_shardings, donate_argnums=0)
        return around(params, jax.random.PRNGKey(run.train_cfg.seed))
    init = jax.jit(run.init_fn(), out_shardings=run.state_shardings)
    with sharding.sharding_context(run.mesh):  # the parameters' own logical constraints apply inside init too
        return init(jax.random.PRNGKey(run.train_cfg.seed))


# Optimizer state leaves that mirror no parameter and are a few numbers: replicated.
_SMALL_STATE = frozenset({"ns_coeffs"})  # Muon's Newton-Schulz coefficients [3] or [steps, 3]


def opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an (abstract) optimizer state: each leaf follows the parameter it mirrors.

    Matched by key path: optax keeps moments as copies of the params tree (…/mu/blocks/attn/q/kernel),
    so a state leaf whose path ends with a parameter's path and has that parameter's shape gets
    that parameter's sharding. Scalars (step counts) are replicated. Anything else raises rather
    than being silently replicated. This does not depend on how optax nests its states.
    """
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    for (path, leaf), s in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(param_shardings)
    ):
        by_path[_keys(path)] = (tuple(leaf.shape), s)

    def pick(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):  # longest suffix first
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        if leaf.ndim == 0 or keys[-1] in _SMALL_STATE:
            return sharding.replicated(mesh)
        raise ValueError(
            f"optimizer state leaf {sharding.path_str(path)} with shape {leaf.shape} mirrors no parameter; "
            "give it a sharding in gpt2_jax/training/run.py"
        )

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def _keys(path: jax.tree_util.KeyPath) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)
