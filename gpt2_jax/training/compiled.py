"""What the compiler says about a run's programs: memory per device, FLOPs, kernels, and the largest
micro-batch that fits. Everything is lowered from abstract inputs, so nothing is allocated, and the
mesh's devices may be a TPU slice this host does not have (gpt2_jax/topology.py).

Used by preflight (training/preflight.py); one program's figures come from gpt2_jax/compile_report.py.
XLA's cost analysis counts a loop body once, and the step loops over layers (scan_layers) and
micro-batches: FLOPs (and bytes accessed) come from 1- and 2-layer copies of the step with layers
unrolled and one micro-batch, F(L) = F(1) + (L - 1) (F(2) - F(1)) (the layers are identical; a model
of one or two layers is its own copy, compiled alone), times the number of micro-batches (which
counts the optimizer update once per micro-batch: well under 1%).
The chunked loss (config.model.loss_chunk) is a loop too: these copies use whole logits, the same
matmuls; so bytes accessed is that of the whole-logits step (the chunked step's cannot be read off).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from gpt2_jax.compile_report import Compiled, bytes_per_device, measure
from gpt2_jax.training import run as run_lib
from gpt2_jax.training import sharding
from gpt2_jax.training import step as step_lib

__all__ = ["Compiled", "bytes_per_device", "compile_train_step", "compile_eval_step", "largest_micro_batch",
           "train_cost_per_step"]


def compile_program(jitted: Any, *args: Any, mesh: Any) -> Compiled:
    """Lowers and compiles `jitted(*args)` (abstract args) under the mesh's sharding rules."""

    def build():
        with sharding.sharding_context(mesh):
            return jitted.lower(*args).compile()

    return measure(build)


def abstract_batch(run: run_lib.Run, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    spec = run.batch_sharding
    return {k: jax.ShapeDtypeStruct((batch_size, run.model_config.block_size), jnp.int32, sharding=spec)
            for k in step_lib.BATCH_KEYS}


def with_train(train_cfg: Any, **changes: Any) -> ml_collections.ConfigDict:
    """A copy of a config.train block with some keys changed (the caller's config is left alone)."""
    out = ml_collections.ConfigDict(train_cfg.to_dict())
    out.update(changes)
    return out


def compile_train_step(run: run_lib.Run) -> Compiled:
    """The train step of `run`, for its global batch."""
    step = step_lib.make_train_step(run)
    result = compile_program(step.jitted, run.abstract_state, abstract_batch(run, run.train_cfg.global_batch_size),
                             mesh=run.mesh)
    if result.peak_bytes is None and result.temp_bytes is not None and result.argument_bytes is None:
        # Refused: arguments (the state, donated into the outputs) + the temporaries it asked for.
        result.argument_bytes = bytes_per_device(run.abstract_state)
        result.peak_bytes = result.argument_bytes + result.temp_bytes
    return result


def compile_eval_step(run: run_lib.Run) -> Compiled:
    """The eval step on one micro-batch, the rows the trainer evaluates at a time."""
    step = step_lib.make_eval_step(run)
    rows = step_lib.eval_batch_size(run.train_cfg)
    return compile_program(step.jitted, run.abstract_state.params, abstract_batch(run, rows), mesh=run.mesh)


def train_cost_per_step(run: run_lib.Run) -> tuple[float | None, float | None]:
    """(FLOPs of one optimizer step over all devices, bytes one device accesses in it), from compiled
    programs (module docstring). Bytes accessed is XLA's cost-analysis count of HBM traffic."""
    t, model_config = run.train_cfg, run.model_config
    accum = t.grad_accum_steps
    one_micro = with_train(t, global_batch_size=t.global_batch_size // accum, grad_accum_steps=1)
    layer_counts = (1, 2) if model_config.n_layer > 2 else (model_config.n_layer,)
    costs = []
    for layers in layer_counts:
        # Whole logits: the chunked loss is a loop too, and runs the same matmuls (it recomputes nothing).
        small = run_lib.build_run(model_config.replace(scan_layers=False, n_layer=layers, loss_chunk=0), one_micro,
                                  run.mesh, run.num_steps, document_mask=run.document_mask)
        costs.append(compile_train_step(small))

    def total(counts: list[float | None]) -> float | None:
        if None in counts:
            return None
        if len(counts) == 1:  # F(n_layer) itself
            return accum * counts[0]
        f1, f2 = counts
        return accum * (f1 + (model_config.n_layer - 1) * (f2 - f1))

    flops = total([c.flops for c in costs])
    return (None if flops is None else flops * run.mesh.size), total([c.bytes_accessed for c in costs])


@dataclasses.dataclass
class Fit:
    per_device: int | None  # the largest micro-batch rows per batch shard (data x fsdp) that fit
    exact: bool  # True: found by compiling (it fits, one more does not); False: a linear estimate
    note: str


def largest_micro_batch(run: run_lib.Run, first: Compiled, usable_bytes: int, *, search: bool) -> Fit:
    """The largest micro-batch per batch shard whose train step fits `usable_bytes` per device.

    Peak memory is close to linear in the micro-batch: two compiles (the run's own, `first`, and one
    more) give the line, and its crossing with `usable_bytes` is the estimate. With `search`, compiles
    then bracket the estimate and bisect to the exact answer (fits at n, not at n + 1), by
    `Compiled.fits_in(usable_bytes)`.
    """
    t = run.train_cfg
    ways = sharding.batch_divisor(run.mesh)
    accum = t.grad_accum_steps
    b0 = t.global_batch_size // accum // ways
    peaks: dict[int, Compiled] = {b0: first}

    def at(b: int) -> Compiled:
        if b not in peaks:
            peaks[b] = compile_train_step(run_lib.build_run(
                run.model_config, with_train(t, global_batch_size=b * ways * accum),
                run.mesh, run.num_steps, document_mask=run.document_mask))
        return peaks[b]

    if first.peak_bytes is None:
        return Fit(None, False, "no memory figure from the compiler")
    b1 = b0 * 2 if first.fits else max(b0 // 2, 1)
    if b1 == b0:
        b1 = b0 + 1
    second = at(b1)
    if second.peak_bytes is None:
        return Fit(None, False, "no memory figure from the compiler")
    slope = (second.peak_bytes - first.peak_bytes) / (b1 - b0)
    if slope <= 0:
        return Fit(None, False, "peak memory did not grow with the batch")
    estimate = int((usable_bytes - first.peak_bytes) / slope + b0)
    if not search:
        return Fit(max(estimate, 0), False, f"estimate: peak linear in the micro-batch ({b0} and {b1} compiled)")
    def fits(b: int) -> bool:
        return at(b).fits_in(usable_bytes)

    # Bracket the answer around the estimate (steps doubling away from it), then bisect: fits at
    # `low`, not at `high`.
    n = max(estimate, 1)
    if fits(n):
        low, step = n, 1
        while fits(low + step):
            low, step = low + step, step * 2
        high = low + step
    else:
        high, step = n, 1
        while high - step >= 1 and not fits(high - step):
            high, step = high - step, step * 2
        low = max(high - step, 0)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    n = low
    if n == 0:
        return Fit(0, True, "compiled: not even 1 row per shard fits")
    return Fit(n, True, f"compiled: {n} fits, {n + 1} does not")
