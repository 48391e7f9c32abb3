"""The pure train and eval steps, each jitted once with the shardings of a `Run` (training/run.py).

`make_train_step(run)` returns `train_step(state, batch) -> (state, metrics)` with the state
donated; `make_eval_step(run)` returns `eval_step(params, batch) -> {"loss"}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2_jax.data.documents import document_layout
from gpt2_jax.model import GPT2, ModelConfig
from gpt2_jax.model import loss as loss_lib
from gpt2_jax.training import sharding
from gpt2_jax.training.run import Run, TrainState

Batch = dict[str, jax.Array]  # {"inputs": int32 [B, T], "targets": int32 [B, T]}
BATCH_KEYS = ("inputs", "targets")


# --------------------------------------------------------------------------- loss
def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in fp32. logits [B, T, V] (true vocab), targets int [B, T]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    return jnp.mean(log_z - target_logit)


def loss_fn(
    params: Any, batch: Batch, *, model_config: ModelConfig, dropout_rng: jax.Array | None = None,
    document_mask: bool = False,
) -> jax.Array:
    """Mean loss of one batch. dropout_rng=None runs deterministically (no dropout).

    With `config.loss_chunk` resolved to N > 0 (gpt2_jax/model/loss.py) the head runs N positions
    at a time and no [B, T, V] logits exist; the loss and gradients are the same. With
    `document_mask` each token attends inside its own document only, positions restarting at each
    `<|endoftext|>` (gpt2_jax/data/documents.py).
    """
    positions, segment_ids = document_layout(batch["inputs"]) if document_mask else (None, None)
    chunk = loss_lib.resolve_loss_chunk(model_config)
    if chunk:
        return loss_lib.chunked_mean_loss(model_config, params, batch["inputs"], batch["targets"], chunk=chunk,
                                          dropout_rng=dropout_rng, positions=positions, segment_ids=segment_ids)
    logits = GPT2(model_config).apply(
        {"params": params},
        batch["inputs"],
        positions,
        segment_ids=segment_ids,
        deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
    )  # [B, T, V]
    return cross_entropy(logits, batch["targets"])


# --------------------------------------------------------------------------- steps
@dataclasses.dataclass(frozen=True)
class OnMesh:
    """A jitted step called with the mesh and logical axis rules in effect.

    The rules are read while tracing, so they must be active at the (first) call; this wrapper
    also checks the batch and raises a clear ValueError before anything is computed.
    """

    jitted: Callable  # the jax.jit-wrapped function (its compile cache, .lower, ...)
    mesh: Mesh
    check_batch: Callable[[Batch], None]

    def __call__(self, first: Any, batch: Batch):
        self.check_batch(batch)
        with sharding.sharding_context(self.mesh):
            return self.jitted(first, batch)


def _batch_checker(model_config: ModelConfig, mesh: Mesh, batch_size: int | None, accum: int) -> Callable:
    ways = sharding.batch_divisor(mesh)

    def check(batch: Batch) -> None:
        if not isinstance(batch, dict) or sorted(batch) != sorted(BATCH_KEYS):
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"batch must be a dict with keys {BATCH_KEYS}, got {keys}")
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
        if len(set(shapes.values())) != 1 or len(shapes["inputs"]) != 2:
            raise ValueError(f"batch inputs and targets must both be [B, T], got shapes {shapes}")
        for k, v in batch.items():
            if v.dtype != jnp.int32:
                raise ValueError(f"batch[{k!r}] must be int32 token ids, got {v.dtype}")
        B, T = shapes["inputs"]
        if model_config.block_size < T:
            raise ValueError(f"batch length T={T} exceeds block_size={model_config.block_size}")
        if batch_size is not None and batch_size != B:
            raise ValueError(f"batch size B={B} differs from config.train.global_batch_size={batch_size}")
        if B % accum or (B // accum) % ways:
            raise ValueError(
                f"batch size B={B} must split into grad_accum_steps={accum} micro-batches each divisible "
                f"by mesh data x fsdp = {ways}"
            )

    return check


def make_train_step(run: Run) -> OnMesh:
    """`train_step(state, batch) -> (state, metrics)`, jitted once; the state is donated.

    The batch (global [B, T] arrays, B = global_batch_size) is split into grad_accum_steps
    micro-batches whose gradients are averaged in a `lax.scan`; micro-batch a holds rows a, a+A, ...

    metrics: fp32 scalars "loss", "grad_norm" (before clipping), "lr" (the scheduled rate for
    state.step) and "skipped" (1.0 when a non-finite update was dropped). With
    skip_nonfinite_updates=True a non-finite loss or gradient norm leaves params and opt_state
    as they were (the optimizer's own count, hence its schedule position, does not advance; step does).
    """
    model_config, train_cfg, mesh, state_shardings = run.model_config, run.train_cfg, run.mesh, run.state_shardings
    tx, schedule = run.tx, run.schedule
    accum = train_cfg.grad_accum_steps
    skip_nonfinite = bool(train_cfg.skip_nonfinite_updates)
    batch_spec = sharding.batch_sharding(mesh)
    # [A, B/A, T]: every micro-batch is split over data x fsdp like the full batch.
    micro_spec = NamedSharding(mesh, PartitionSpec(None, *batch_spec.spec))
    grad_fn = jax.value_and_grad(lambda p, b, rng: loss_fn(p, b, model_config=model_config, dropout_rng=rng,
                                                           document_mask=run.document_mask))

    def split_micro(x: jax.Array) -> jax.Array:
        B, T = x.shape
        # Row i goes to micro-batch i % A: each device's local rows split evenly across
        # micro-batches, so forming them moves no data.
        x = x.reshape(B // accum, accum, T).swapaxes(0, 1)  # [A, B/A, T]
        return jax.lax.with_sharding_constraint(x, micro_spec)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        step_rng = jax.random.fold_in(state.rng, state.step)

        def accumulate(carry, xs):
            loss_sum, grad_sum = carry
            index, micro_batch = xs
            loss, grads = grad_fn(state.params, micro_batch, jax.random.fold_in(step_rng, index))
            grad_sum = jax.tree.map(lambda total, g: total + g.astype(jnp.float32), grad_sum, grads)
            return (loss_sum + loss, grad_sum), None

        if accum == 1:  # no running sum to keep: one pass, gradients straight to the optimizer
            loss, grads = grad_fn(state.params, batch, jax.random.fold_in(step_rng, 0))
        else:
            # The running sum is fp32 whatever param_dtype is, and sharded like the params (under
            # fsdp each device keeps only its shard: gradients are reduce-scattered, not all-reduced).
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, state_shardings.params)
            micro = {k: split_micro(batch[k]) for k in BATCH_KEYS}
            (loss_sum, grad_sum), _ = jax.lax.scan(
                accumulate, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(accum), micro)
            )
            # Equal-sized micro-batches: the mean of their mean losses (and grads) is the full batch's.
            loss = loss_sum / accum
            grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, state.params)
        grad_norm = optax.tree.norm(grads)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skipped = jnp.logical_and(skip_nonfinite, ~finite)
        if skip_nonfinite:
            keep_old = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params = jax.tree.map(keep_old, params, state.params)
            opt_state = jax.tree.map(keep_old, opt_state, state.opt_state)

        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {
            "loss": loss.astype(jnp.float32),
            "grad_norm": grad_norm.astype(jnp.float32),
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
            "skipped": skipped.astype(jnp.float32),
        }
        return new_state, metrics

    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, {k: batch_spec for k in BATCH_KEYS}),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    checker = _batch_checker(model_config, mesh, train_cfg.global_batch_size, accum)
    return OnMesh(jitted, mesh, checker)


def eval_batch_size(train_cfg: Any) -> int:
    """Rows evaluated at a time: one micro-batch. A whole global batch of logits at once would need
    grad_accum_steps times the memory the train step was sized for (it did not fit a v5e chip)."""
    return train_cfg.global_batch_size // train_cfg.grad_accum_steps


def make_eval_step(run: Run) -> OnMesh:
    """`eval_step(params, batch) -> {"loss": fp32 mean loss}`, deterministic, jitted once per batch shape."""
    model_config, mesh, state_shardings = run.model_config, run.mesh, run.state_shardings
    batch_spec = sharding.batch_sharding(mesh)

    def eval_fn(params: Any, batch: Batch) -> dict[str, jax.Array]:
        return {"loss": loss_fn(params, batch, model_config=model_config, document_mask=run.document_mask)}

    jitted = jax.jit(
        eval_fn,
        in_shardings=(state_shardings.params, {k: batch_spec for k in BATCH_KEYS}),
        out_shardings=sharding.replicated(mesh),
    )
    checker = _batch_checker(model_config, mesh, None, 1)
    return OnMesh(jitted, mesh, checker)
