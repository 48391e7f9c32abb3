"""Preflight: what a config will cost on a mesh, before any training (`python train.py --preflight`).

    python train.py --config configs/gpt2_124m.py --preflight
    python train.py --config configs/gpt2_124m.py --config.model.preset=gpt2-xl --preflight --preflight_devices 64

Figures, all per device unless named otherwise:
  * parameters and optimizer state: from abstract shapes (`jax.eval_shape`) and the sharding rules,
    i.e. each leaf's bytes divided by the sizes of the mesh axes that split it. Nothing is allocated.
  * activations / temporaries and the peak: from `memory_analysis()` of the compiled train step,
    the very program training runs (lowered from abstract inputs, so nothing is allocated either).
  * FLOPs per step: XLA's `cost_analysis()`. XLA counts a loop body once, and the configured step
    loops over layers (`scan_layers`), over micro-batches (`grad_accum_steps`) and over the loss's
    chunks (`loss_chunk`), so the count comes from a second compile of the same step with layers
    unrolled, the whole-logits loss (the same matmuls) and one micro-batch, times
    grad_accum_steps (this counts the optimizer update grad_accum_steps times: well under 1% of a
    step). The analytic 6·params·tokens + attention figure the trainer uses for MFU is shown beside it.

With more devices than this machine has (`num_devices` > `len(jax.devices())`), the mesh is a
`jax.sharding.AbstractMesh`: state sizes are still exact, compilation is skipped (no activation,
peak or compiled FLOP figures), and the report says so.

Warnings (the run may still start, but is probably not what you want):
  * the batch does not divide: global_batch_size by grad_accum_steps, or a micro-batch by the
    batch-splitting mesh axes data x fsdp (training would refuse to start; compilation is skipped);
  * the state is replicated: fsdp = tensor = 1 on more than one device while the parameters and
    optimizer state take >= REPLICATED_STATE_WARN_BYTES per device: every device holds a whole
    copy that fsdp (e.g. config.mesh.fsdp=-1, data=1) would split;
  * device memory overflow: the per-device peak (or, without compilation, the state alone) exceeds
    the device's memory (`memory_stats()["bytes_limit"]`, or `device_memory_gb` in GiB where a device
    does not report it, as on CPU).
A check that could not run (no device memory size; no peak without compilation) is listed under
"not checked", so the report never says "warnings: none" about what it did not check.
Mistakes that make the run impossible (no mesh for this device count, a model dimension that a mesh
axis does not divide) raise ValueError, as training itself would.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections

from gpt2_jax import topology as topology_lib
from gpt2_jax.compile_report import human_bytes
from gpt2_jax.model import platform
from gpt2_jax.model.attention import resolve_attention
from gpt2_jax.model.config import ModelConfig, count_params
from gpt2_jax.training import compiled as compiled_lib
from gpt2_jax.training import init_from, sharding
from gpt2_jax.training import run as run_lib
from gpt2_jax.training.run_config import TrainConfig

REPLICATED_STATE_WARN_BYTES = 1 << 30  # 1 GiB: below this, replicating the state costs little


def report(config: Any, num_devices: int | None = None, *, device_memory_gb: float | None = None,
           topology: str | None = None, slices: int | None = None, fit_search: bool = False) -> dict:
    """Per-device memory, FLOPs and warnings for training `config` on `num_devices` devices.

    `config` is a full training config (configs/*.py). `num_devices` defaults to every device of this
    process's run; more than that plans from abstract shapes without compiling. `device_memory_gb`
    (GiB, 2**30 bytes) replaces the device's own memory figure (needed on CPU, which reports none).

    `topology` (a Cloud TPU type, e.g. "v5e-8"; training/topology.py) compiles for that slice instead,
    `slices` of them (config.mesh.slices, the data axis across slices); the figures then include the
    attention the TPU runs, its Mosaic kernels, whether the step fits a chip's HBM, the largest
    micro-batch that does (`fit_search`: found by compiling, else a linear estimate) and the eval step.
    Returns plain numbers (bytes, FLOPs) and strings; `format_report` renders them.
    """
    # init_from's architecture where it is set
    model_config = init_from.model_config_for(config.model, cache_dir=config.data.cache_dir)
    t = TrainConfig.of(config.train)  # every config.train check (run_config.py)
    mesh_cfg = ml_collections.ConfigDict(config.mesh.to_dict())
    if slices is not None:
        mesh_cfg.slices = slices
    spec = None
    if topology is not None:
        spec = topology_lib.parse(topology)
        devices = topology_lib.devices(spec, sharding.num_slices(mesh_cfg))
        available = n = len(devices)
    else:
        devices = jax.devices()
        available = len(devices)
        n = available if num_devices is None else num_devices
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_devices={num_devices!r} must be a positive integer")
    if n <= available:
        mesh = sharding.make_mesh(mesh_cfg, devices=devices[:n])
    else:
        shape = sharding.mesh_shape(mesh_cfg, n)
        mesh = jax.sharding.AbstractMesh(
            tuple(shape[a] for a in sharding.MESH_AXES), sharding.MESH_AXES,
            axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES),
        )
    mesh_sizes = {axis: int(mesh.shape[axis]) for axis in sharding.MESH_AXES}

    accum = t.grad_accum_steps  # a positive integer: TrainConfig.validate
    batch_warnings = _batch_warnings(t, mesh_sizes)
    warnings = list(batch_warnings)
    # State sizes do not depend on the batch: a batch that does not divide is a warning above, so
    # build the state against one that does (model dimensions are still checked, and raise).
    state_train_cfg = compiled_lib.with_train(t, global_batch_size=sharding.batch_divisor(mesh) * accum)
    num_steps = max(int(t.num_steps), 1)  # shapes only; the schedule does not change them
    run = run_lib.build_run(model_config, state_train_cfg, mesh, num_steps, document_mask=config.data.document_mask)
    abstract = run.abstract_state
    params_bytes = bytes_per_device(abstract.params)
    opt_state_bytes = bytes_per_device(abstract.opt_state)
    state_bytes = bytes_per_device(abstract)

    device = devices[0]
    if spec is not None:
        memory_limit, memory_source = spec.hbm_bytes, f"{spec.generation} HBM per chip"
        if spec.usable_bytes is not None:
            memory_limit = spec.usable_bytes
            memory_source = (f"{topology_lib.GPU_MEMORY_FRACTION:.0%} of an {spec.generation}'s "
                             f"{human_bytes(spec.hbm_bytes)}: jax preallocates that much")
    else:
        memory_limit, memory_source = _device_memory(device, device_memory_gb)
    tokens_per_step = t.global_batch_size * model_config.block_size
    on = platform.of_mesh(mesh) if n <= available else platform.of_devices(devices)
    figures: dict[str, Any] = {
        "model": _model_name(config.model, model_config),
        "params": count_params(abstract.params),
        "topology": topology,
        "slices": sharding.num_slices(mesh_cfg),
        "num_devices": n,
        "devices": n,
        "available_devices": available,
        "device_kind": device.device_kind,
        "mesh": mesh_sizes,
        "attention": resolve_attention(model_config, on.name)[0],
        "global_batch_size": t.global_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "micro_batch_per_device": t.global_batch_size / accum / sharding.batch_divisor(mesh),
        "block_size": model_config.block_size,
        "remat": model_config.remat,
        "tokens_per_step": tokens_per_step,
        "params_bytes": params_bytes,
        "opt_state_bytes": opt_state_bytes,
        "state_bytes": state_bytes,
        "activation_bytes": None,
        "peak_bytes": None,
        "peak_bytes_per_device": None,
        "device_memory_bytes": memory_limit,
        "hbm_bytes_per_device": spec.hbm_bytes if spec is not None else memory_limit,
        "device_memory_source": memory_source,
        "fits": None,
        "mosaic_kernels": None,
        "cudnn_attention": None,
        "flops_per_step": None,
        "bytes_accessed_per_chip": None,
        "flops_per_step_analytic": model_config.train_flops_per_token(model_config.block_size) * tokens_per_step,
        "largest_micro_batch_per_device": None,
        "largest_micro_batch_note": "",
        "eval_step": None,
        "compiled": False,
        "compile_note": "",
        "compile_s": None,
        "warnings": warnings,
    }

    if n > available:
        figures["compile_note"] = (
            f"compilation skipped: {n} devices requested, {available} available here; sizes come from "
            "abstract shapes, activations and compiled FLOPs are unknown"
        )
    elif batch_warnings:
        figures["compile_note"] = "compilation skipped: the batch does not divide (see warnings)"
    else:
        start = time.perf_counter()
        full_run = run_lib.build_run(model_config, t, mesh, num_steps, document_mask=config.data.document_mask)
        figures.update(_compiled_figures(full_run, spec, memory_limit, fit_search))
        figures["compile_s"] = time.perf_counter() - start
        figures["compiled"] = True

    if n > 1 and mesh_sizes["fsdp"] * mesh_sizes["tensor"] == 1 and state_bytes >= REPLICATED_STATE_WARN_BYTES:
        warnings.append(
            f"state replicated: config.mesh.fsdp=1 and tensor=1, so each of the {n} devices holds all "
            f"{human_bytes(state_bytes)} of parameters and optimizer state; config.mesh.fsdp=-1 with data=1 "
            f"would hold {human_bytes(state_bytes / n)} per device"
        )
    unchecked = figures["unchecked"] = []  # checks that could not run: "warnings: none" would mislead
    if memory_limit is None:
        unchecked.append("device memory overflow: the device reports no memory size "
                         "(--preflight_device_memory_gb sets it)")
    elif figures["peak_bytes"] is None:
        unchecked.append("peak memory: not computed (" + (figures["compile_note"] or "no memory analysis") +
                         "); only parameters + optimizer state were checked against the device memory")
    if memory_limit is not None:
        need = figures["peak_bytes"] if figures["peak_bytes"] is not None else state_bytes
        what = "peak (state + activations)" if figures["peak_bytes"] is not None else \
            "parameters + optimizer state alone (activations come on top)"
        if figures["fits"] is False or need > memory_limit:
            warnings.append(
                f"device memory overflow: {what} need {human_bytes(need)} per device, the device has "
                f"{human_bytes(memory_limit)} ({memory_source}); " + _remedy(figures, model_config)
            )
    if figures["fits"] is None and figures["peak_bytes"] is not None and memory_limit is not None:
        figures["fits"] = figures["peak_bytes"] <= memory_limit
    return figures


def _remedy(figures: dict, model_config: ModelConfig) -> str:
    """Which knob makes a step that does not fit fit."""
    largest, micro = figures["largest_micro_batch_per_device"], figures["micro_batch_per_device"]
    gbs, ways = figures["global_batch_size"], figures["mesh"]["data"] * figures["mesh"]["fsdp"]
    # The fewest micro-batches whose size per shard divides and is at most `largest`.
    needed = next((a for a in range(figures["grad_accum_steps"], gbs + 1)
                   if gbs % (a * ways) == 0 and gbs // (a * ways) <= largest), None) \
        if largest and micro and largest < micro else None
    knobs = [f"config.train.grad_accum_steps={needed} (a micro-batch of {gbs // (needed * ways)} per device; "
             f"{largest} fit)" if needed else "smaller micro-batches (raise config.train.grad_accum_steps)"]
    if model_config.remat == "none":
        knobs.append("config.model.remat='full' (or 'save_qkv', 'save_dots': recompute block activations)")
    knobs.append("more fsdp (config.mesh.fsdp)")
    return ("set " if needed else "use ") + ", or ".join(knobs)


bytes_per_device = compiled_lib.bytes_per_device


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """config.mesh resolved for `num_devices` devices, without devices (sharding.make_mesh's rules)."""
    return sharding.mesh_shape(mesh_cfg, num_devices)


def _batch_warnings(t: Any, mesh_sizes: dict[str, int]) -> list[str]:
    """The batch rules of sharding.validate_mesh_for, as warnings instead of errors."""
    data, fsdp = mesh_sizes["data"], mesh_sizes["fsdp"]
    ways = data * fsdp
    gbs, accum = t.global_batch_size, t.grad_accum_steps
    out = []
    if gbs % accum:
        out.append(f"batch: config.train.global_batch_size={gbs} is not divisible by "
                   f"config.train.grad_accum_steps={accum}")
    elif (gbs // accum) % ways:
        out.append(f"batch: the micro-batch global_batch_size / grad_accum_steps = {gbs} / {accum} = "
                   f"{gbs // accum} is not divisible by mesh data x fsdp = {data} x {fsdp} = {ways}")
    return out


def _compiled_figures(run: run_lib.Run, spec: Any, memory_limit: int | None, fit_search: bool) -> dict[str, Any]:
    """Figures from the compiled programs of `run` (abstract inputs only; see training/compiled.py)."""
    figures: dict[str, Any] = {}
    train = compiled_lib.compile_train_step(run)
    figures.update(activation_bytes=train.temp_bytes, peak_bytes=train.peak_bytes,
                   peak_bytes_per_device=train.peak_bytes, mosaic_kernels=train.mosaic_kernels,
                   cudnn_attention=train.cudnn_attention,
                   train_compile_s=train.compile_s)
    if spec is not None or not train.fits:
        figures["fits"] = train.fits_in(memory_limit)
        if not train.fits:
            figures["compile_error"] = train.error
    flops, accessed = compiled_lib.train_cost_per_step(run)
    figures["flops_per_step"] = flops
    figures["bytes_accessed_per_chip"] = accessed
    if spec is not None:
        usable = train.usable_bytes or memory_limit
        fit = compiled_lib.largest_micro_batch(run, train, usable, search=fit_search)
        figures["largest_micro_batch_per_device"] = fit.per_device
        figures["largest_micro_batch_exact"] = fit.exact
        figures["largest_micro_batch_note"] = fit.note
        if train.fits:
            evaluated = compiled_lib.compile_eval_step(run)
            figures["eval_step"] = {"fits": evaluated.fits, "peak_bytes": evaluated.peak_bytes,
                                    "mosaic_kernels": evaluated.mosaic_kernels,
                                    "cudnn_attention": evaluated.cudnn_attention, "compile_s": evaluated.compile_s}
    return figures


def _device_memory(device: jax.Device, override_gb: float | None) -> tuple[int | None, str | None]:
    if override_gb is not None:
        if override_gb <= 0:
            raise ValueError(f"device_memory_gb={override_gb} must be positive")
        return int(override_gb * (1 << 30)), "--preflight_device_memory_gb"
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats"
    return None, None


def _model_name(model_cfg: Any, model_config: ModelConfig) -> str:
    if model_cfg.preset:
        return model_cfg.preset
    return f"{model_config.n_layer} layers x {model_config.n_embd} embd"


def format_report(figures: dict) -> str:
    """The report as text, for a terminal."""
    f = figures
    mesh = " x ".join(f"{axis}={size}" for axis, size in f["mesh"].items())
    micro = f["global_batch_size"] // max(f["grad_accum_steps"], 1)
    ways = f["mesh"]["data"] * f["mesh"]["fsdp"]
    unknown = "unknown (not compiled)"
    memory = (f"{human_bytes(f['device_memory_bytes'])} ({f['device_memory_source']})" if f["device_memory_bytes"]
              else "unknown (--preflight_device_memory_gb sets it)")
    if f["topology"]:
        slices = f" x {f['slices']} slices" if f["slices"] > 1 else ""
        where = f"{f['num_devices']} x {f['device_kind']} ({f['topology']}{slices}, compiled on this host, no device)"
    else:
        where = f"{f['num_devices']} x {f['device_kind']} ({f['available_devices']} available here)"
    lines = [
        f"preflight: {f['model']}, {f['params']:,} parameters",
        f"devices:   {where}",
        f"mesh:      {mesh}",
        f"attention: {f['attention']}" + (
            f" ({f['cudnn_attention']} cuDNN attention call(s) in the train step)" if f["cudnn_attention"]
            else f" ({f['mosaic_kernels']} Mosaic kernel(s) in the train step)"
            if f["mosaic_kernels"] is not None and f["topology"] else ""),
        f"batch:     {f['global_batch_size']} x {f['block_size']} tokens = {f['tokens_per_step']:,} tokens/step, "
        f"{f['grad_accum_steps']} micro-batch(es) of {micro} = {micro / ways:g} per data x fsdp shard",
        "per device:",
        f"  parameters          {human_bytes(f['params_bytes'])}",
        f"  optimizer state     {human_bytes(f['opt_state_bytes'])}",
        f"  activations / temp  {human_bytes(f['activation_bytes']) if f['activation_bytes'] is not None else unknown}",
        f"  peak                {human_bytes(f['peak_bytes']) if f['peak_bytes'] is not None else unknown}",
        f"  device memory       {memory}",
    ]
    if f["fits"] is not None:
        lines.append("  fits                " + ("yes" if f["fits"] else "NO" + (
            f" (the compiler refused it: {f['compile_error']})" if f.get("compile_error") else "")))
    if f["largest_micro_batch_per_device"] is not None or f["largest_micro_batch_note"]:
        largest = f["largest_micro_batch_per_device"]
        lines.append(f"  largest micro-batch {largest if largest is not None else 'unknown'} sequences per device "
                     f"({f['largest_micro_batch_note']})")
    if f["eval_step"]:
        e = f["eval_step"]
        lines.append(f"  eval step peak      {human_bytes(e['peak_bytes']) if e['peak_bytes'] else 'unknown'}, "
                     f"{'fits' if e['fits'] else 'does NOT fit'}, " + (
                         f"{e['cudnn_attention']} cuDNN attention call(s)" if e["cudnn_attention"]
                         else f"{e['mosaic_kernels']} Mosaic kernel(s)"))
    if f["bytes_accessed_per_chip"] is not None:
        lines.append(f"  bytes accessed      {human_bytes(f['bytes_accessed_per_chip'])} per step "
                     f"({f['bytes_accessed_per_chip'] / (f['tokens_per_step'] / ways) / 1e6:.2f} MB "
                     "per token; XLA cost analysis)")
    lines += [
        "FLOPs per step (all devices):",
        f"  compiled (XLA cost analysis)  {f['flops_per_step']:.3e}" if f["flops_per_step"] is not None
        else f"  compiled (XLA cost analysis)  {unknown}",
        f"  analytic (6 N D + attention)  {f['flops_per_step_analytic']:.3e}",
        "compile:   " + (f"done in {f['compile_s']:.1f} s" if f["compiled"] else f["compile_note"]),
    ]
    if f["warnings"]:
        lines.append("warnings:")
        lines += [f"  - {w}" for w in f["warnings"]]
    elif not f["unchecked"]:
        lines.append("warnings:  none")
    if f["unchecked"]:
        lines.append("not checked:" if f["warnings"] else "warnings:  none found, but not checked:")
        lines += [f"  - {u}" for u in f["unchecked"]]
    return "\n".join(lines)
