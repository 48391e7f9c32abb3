"""Device mesh, the one logical -> mesh axis rules table, and the shardings built from it.

Mesh axes:
  data    replicate parameters, split the batch (plain data parallelism)
  fsdp    split the batch AND shard parameters + optimizer state along "embed" (ZeRO-3)
  tensor  split attention heads, MLP columns and the vocabulary (Megatron-style)

Model code names axes logically ("embed", "heads", "batch", ...); only this file knows the mesh.

Non-divisible dimensions: a parameter dimension whose mesh axes do not divide it is an ERROR
(raised by `logical_to_sharding`, before anything is allocated), never a silent fall-back to
replication. Replicating one dimension of a large matrix quietly multiplies its memory by the
mesh axis size, which on a big model turns into an OOM far from the cause; the fix is nearly
always a different mesh or `pad_vocab_to_multiple`. `validate_mesh_for` checks the config-level
rules first so the usual mistakes are reported by config key.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.layers import ACTIVATION_AXES, BATCH, LENGTH
from gpt2_jax.training.run_config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

# The one table: every logical axis name used by the model (parameters and activations) -> the
# mesh axes it is split over (None = replicated). In flax's rule format so it can be handed to
# `nn.logical_axis_rules` for the activation constraints in layers.py. A name missing here is
# an error (see `logical_spec`), not a replicated dimension.
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # activations
    ("batch", ("data", "fsdp")),  # every batch-splitting axis
    ("length", None),
    ("act_embed", None),  # activations stay whole along E; fsdp gathers weights instead
    # parameters
    ("embed", "fsdp"),  # ZeRO-3: every matrix has an E axis, so fsdp shards almost everything
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("kv", None),  # the k/v pair axis of size 2
    ("layers", None),  # the scanned stack: each step needs its whole layer
    ("position", None),
)
_RULES: dict[str, MeshAxes] = dict(LOGICAL_AXIS_RULES)


# --------------------------------------------------------------------------- mesh
def num_slices(mesh_cfg: Any) -> int:
    """config.mesh.slices (1 where a mesh config has no such key), checked."""
    return MeshConfig.of(mesh_cfg).slices


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """`config.mesh` resolved for `num_devices` devices (-1 takes all remaining ones), or ValueError.

    With config.mesh.slices = K > 1 the devices form K slices: data, fsdp and tensor (and -1) are
    resolved for one slice's num_devices / K devices, and the data axis then spans the K slices
    (K x data): only data parallelism crosses the slower network between slices, as in MaxText's
    dcn_data_parallelism. Needs no devices, so preflight can lay out meshes larger than this machine.
    """
    mesh_cfg = MeshConfig.of(mesh_cfg)  # each key checked there (run_config.py)
    slices = mesh_cfg.slices
    if num_devices % slices:
        raise ValueError(f"config.mesh.slices={slices} does not divide the device count {num_devices}")
    n = num_devices // slices
    sizes = {axis: mesh_cfg[axis] for axis in MESH_AXES}
    shown = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
    where = f" in each of {slices} slices" if slices > 1 else ""

    fill = [axis for axis, size in sizes.items() if size == -1]
    known = math.prod(size for size in sizes.values() if size != -1)
    if known > n:
        raise ValueError(f"config.mesh: {shown} needs {known} devices, but only {n} are available{where}")
    if fill:
        if n % known:
            raise ValueError(
                f"config.mesh.{fill[0]}=-1 cannot take the remaining devices: {n} devices{where} are not divisible "
                f"by the other axes' product {known} ({shown})"
            )
        sizes[fill[0]] = n // known
    total = math.prod(sizes.values())
    if total != n:
        raise ValueError(
            f"config.mesh: data x fsdp x tensor = {total} ({shown}) must equal the device count {n}{where}; "
            "set one axis to -1 to take the remaining devices"
        )
    sizes["data"] *= slices
    return sizes


def _slice_groups(devices: list[jax.Device], slices: int) -> list[list[jax.Device]]:
    """The devices of each slice: by the devices' slice_index (TPU), else K equal runs (simulated)."""
    if slices == 1:
        return [devices]
    if all(getattr(d, "slice_index", None) is not None for d in devices):
        indices = sorted({d.slice_index for d in devices})
        if len(indices) != slices:
            raise ValueError(f"config.mesh.slices={slices}, but the devices come from {len(indices)} slice(s)")
        return [[d for d in devices if d.slice_index == i] for i in indices]
    per = len(devices) // slices
    return [devices[i * per:(i + 1) * per] for i in range(slices)]


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh from `config.mesh`; -1 takes all remaining devices.

    `mesh_cfg` is the `config.mesh` ConfigDict (or a dict) with integer keys data, fsdp, tensor
    (and optionally slices). The product must equal the number of devices (all of `jax.devices()`
    by default). With slices = K > 1, each slice's devices form a data x fsdp x tensor block and
    the K blocks are stacked along data (a hybrid mesh: fsdp and tensor stay inside a slice).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    slices = num_slices(mesh_cfg)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # the compiler propagates from our shardings
    if slices == 1:
        # jax.make_mesh orders devices along the physical topology (rings on TPU).
        return jax.make_mesh(tuple(sizes[axis] for axis in MESH_AXES), MESH_AXES, axis_types=axis_types,
                             devices=devices)
    per_slice = (sizes["data"] // slices, sizes["fsdp"], sizes["tensor"])
    blocks = []
    for group in _slice_groups(devices, slices):
        if group[0].platform == "tpu":  # physical order inside the slice, as jax.make_mesh does
            from jax.experimental import mesh_utils

            blocks.append(mesh_utils.create_device_mesh(per_slice, devices=group))
        else:
            blocks.append(np.array(group, dtype=object).reshape(per_slice))
    return Mesh(np.concatenate(blocks, axis=0), MESH_AXES, axis_types=axis_types)


@contextlib.contextmanager
def sharding_context(mesh: Mesh) -> Iterator[None]:
    """Mesh + logical rules in effect, so the model's `nn.with_logical_constraint` calls apply.

    Enter it around tracing (the first call of a jitted function); outside it the activation
    constraints in layers.py are silently no-ops.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield


# --------------------------------------------------------------------------- logical -> mesh
def logical_spec(names: Sequence[str | None], where: str = "") -> PartitionSpec:
    """Logical axis names of one array -> PartitionSpec. Unknown names raise."""
    unknown = [name for name in names if name is not None and name not in _RULES]
    if unknown:
        raise ValueError(
            f"{where or 'array'}: logical axis names {unknown} have no rule in "
            f"gpt2_jax.training.sharding.LOGICAL_AXIS_RULES (known: {sorted(_RULES)})"
        )
    spec = [None if name is None else _RULES[name] for name in names]
    used = [axis for axes in spec if axes is not None for axis in ((axes,) if isinstance(axes, str) else axes)]
    if len(used) != len(set(used)):
        raise ValueError(f"{where or 'array'}: logical axes {tuple(names)} map to mesh axes {spec}, "
                         "which use one mesh axis twice")
    return PartitionSpec(*spec)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def path_str(path: jax.tree_util.KeyPath) -> str:
    """("blocks", "attn", "q", "kernel") key path -> "blocks/attn/q/kernel"."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def check_logical_names(boxed_tree: Any) -> None:
    """Raises ValueError unless every leaf is boxed with names that all have a rule."""

    def check(path, leaf):
        where = path_str(path)
        if not _is_box(leaf):
            raise ValueError(f"{where}: has no logical axis names (create it with nn.with_logical_partitioning)")
        logical_spec(leaf.names, where)

    jax.tree_util.tree_map_with_path(check, boxed_tree, is_leaf=_is_box)


def logical_to_sharding(boxed_tree: Any, mesh: Mesh) -> Any:
    """Boxed (nn.Partitioned) tree -> the same tree, unboxed, of NamedShardings on `mesh`.

    Raises ValueError naming the parameter path, its shape, the logical axis and the mesh axis
    size when a mesh axis does not divide the dimension it splits (see the module docstring).
    """

    def to_sharding(path, leaf):
        where = path_str(path)
        if not _is_box(leaf):
            raise ValueError(f"{where}: has no logical axis names (create it with nn.with_logical_partitioning)")
        spec = logical_spec(leaf.names, where)
        shape = tuple(leaf.value.shape)
        for dim, (name, axes) in enumerate(zip(leaf.names, spec)):
            size = _axis_size(mesh, axes)
            if shape[dim] % size:
                raise ValueError(
                    f"{where} with shape {shape}: dimension {dim} (logical axis {name!r}, size {shape[dim]}) "
                    f"is not divisible by mesh axis {axes!r} of size {size}; change config.mesh or the model "
                    "shape (e.g. model.pad_vocab_to_multiple for the vocabulary)"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(to_sharding, boxed_tree, is_leaf=_is_box)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [B, T] token array: B split over data x fsdp, T whole."""
    return NamedSharding(mesh, logical_spec((BATCH, LENGTH), "batch"))


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the batch dimension is split (data x fsdp)."""
    return _axis_size(mesh, _RULES[BATCH])


# --------------------------------------------------------------------------- config checks
def validate_mesh_for(model_config: ModelConfig, train_cfg: Any, mesh: Mesh) -> None:
    """Config-level divisibility rules for a mesh; ValueError names the key, its value and the rule.

    `train_cfg` is the `config.train` block (global_batch_size, grad_accum_steps).
    """
    batch_ways = batch_divisor(mesh)
    data, fsdp, tensor = (mesh.shape[a] for a in MESH_AXES)
    gbs, accum = train_cfg.global_batch_size, train_cfg.grad_accum_steps

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    need(gbs % batch_ways == 0,
         f"config.train.global_batch_size={gbs} is not divisible by mesh data x fsdp = {data} x {fsdp} = {batch_ways}")
    need(gbs % accum == 0,
         f"config.train.global_batch_size={gbs} is not divisible by config.train.grad_accum_steps={accum}")
    micro = gbs // accum
    need(micro % batch_ways == 0,
         f"micro-batch size global_batch_size / grad_accum_steps = {gbs} / {accum} = {micro} is not divisible "
         f"by mesh data x fsdp = {data} x {fsdp} = {batch_ways}")
    for key, value in (
        ("n_head", model_config.n_head),
        ("n_kv_head", model_config.kv_heads),
        ("mlp dim (n_inner, default 4 * n_embd)", model_config.mlp_dim),
        ("padded vocab (vocab_size rounded up to pad_vocab_to_multiple)", model_config.padded_vocab_size),
    ):
        need(value % tensor == 0, f"config.model.{key}={value} is not divisible by config.mesh.tensor={tensor}")
    need(model_config.n_embd % fsdp == 0,
         f"config.model.n_embd={model_config.n_embd} is not divisible by config.mesh.fsdp={fsdp}")


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """Bytes of a tree of (sharded) arrays held by each device: the ZeRO-3 memory check."""
    held: dict[jax.Device, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + int(np.prod(shard.data.shape)) * leaf.dtype.itemsize
    return held


# Every activation name the model constrains must have a rule: checked at import time, so a new
# constant in layers.py without a rule fails loudly here.
logical_spec(ACTIVATION_AXES, "gpt2_jax.model.layers.ACTIVATION_AXES")
