"""The devices of a Cloud TPU slice that this host does not have, for compiling its programs here.

    python train.py --config configs/gpt2_124m.py --preflight --topology v5e-8 [--slices 2]

Names are Cloud TPU accelerator types, as `gcloud compute tpus tpu-vm create --accelerator-type`
takes them. Their number counts TensorCores: a v5e / v6e chip has one, so v5e-8 is 8 chips; a v4
or v5p chip has two, fused into one jax device ("megacore"), so v4-8 and v5p-8 are 4 devices.
`jax.experimental.topologies.get_topology_desc` builds the slice's devices from libtpu (the
`tpu` extra: `pip install -e ".[tpu]"`) without a chip; a mesh over them compiles the very
program a TPU VM of that type runs.

`prepare_environment()` must run before jax is imported: it keeps jax on the CPU backend (so
libtpu does not look for a chip or a metadata server) and lets several processes load libtpu.
"""

from __future__ import annotations

import dataclasses
import os
import re

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
    prefix: str  # the topology name's prefix for get_topology_desc ("v5e", "v5p" is "v5")
    cores_per_chip: int  # TensorCores counted in the accelerator type's number
    hbm_bytes: int  # per chip (= per jax device)
    dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus
    megacore: bool  # two cores driven as one device


GENERATIONS = {
    "v4": Generation("v4", 2, 32 * GIB, 3, True),
    "v5e": Generation("v5e", 1, 16 * GIB, 2, False),
    "v5p": Generation("v5", 2, 95 * GIB, 3, True),
    "v6e": Generation("v6e", 1, 32 * GIB, 2, False),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}

# Chip grids of the slice shapes Cloud TPU sells: 2-D for v5e / v6e, 3-D for v4 / v5p.
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}

INSTALL = 'pip install -e ".[tpu]"'


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given, e.g. "v5e-8"
    generation: str  # "v4" | "v5e" | "v5p" | "v6e"
    chips: int  # devices per slice
    topology: str  # get_topology_desc's name, e.g. "v5e:2x4"
    hbm_bytes: int  # per device

    @property
    def megacore(self) -> bool:
        return GENERATIONS[self.generation].megacore


def known_names() -> str:
    """Examples of valid names, for error lines."""
    return ("v4-8..v4-8192, v5e-1/4/8/16/.../256 (or v5litepod-N), v5p-8..v5p-8192, v6e-1/4/8/.../256; "
            "N counts TensorCores (two per v4 / v5p chip)")


def parse(name: str) -> Slice:
    """'v5e-8' -> Slice(v5e, 8 chips, 'v5e:2x4', 16 GiB), or ValueError naming the rule."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    gen_name = _ALIASES.get(match.group(1), match.group(1)) if match else None
    if gen_name not in GENERATIONS:
        raise ValueError(f"--topology {name!r}: unknown TPU type; known: {known_names()}")
    gen = GENERATIONS[gen_name]
    cores = int(match.group(2))
    grid = (_GRID_3D if gen.dims == 3 else _GRID_2D).get(cores // gen.cores_per_chip)
    if cores % gen.cores_per_chip or grid is None:
        raise ValueError(f"--topology {name!r}: no {gen_name} slice has {cores} TensorCores; known: {known_names()}")
    chips = cores // gen.cores_per_chip
    return Slice(name, gen_name, chips, f"{gen.prefix}:{'x'.join(map(str, grid))}", gen.hbm_bytes)


def prepare_environment(spec: Slice | None = None) -> None:
    """Before jax is imported: compile for TPU from a host without one (see the module docstring).

    What a TPU VM's metadata server would say is set here (this host is worker 0 of a slice of
    `spec`'s type), else libtpu logs a screenful of warnings about what it could not find."""
    env = {
        "JAX_PLATFORMS": "cpu",  # the TPU devices come from the topology, not from a backend
        "TPU_SKIP_MDS_QUERY": "1",  # no GCE metadata server to ask
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # else libtpu's lock file lets one process at a time load it
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_WORKER_ID": "0",
        "TF_CPP_MIN_LOG_LEVEL": "2",  # libtpu's "logging before InitGoogle" line
    }
    if spec is not None:
        env["TPU_ACCELERATOR_TYPE"] = spec.name.lower().replace("v5e-", "v5litepod-").replace("v6e-", "v6e-")
    for key, value in env.items():
        os.environ.setdefault(key, value)


def libtpu_missing() -> str | None:
    """The error line when libtpu cannot be imported, else None."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return f"--topology needs libtpu, the TPU compiler, which is not installed; install it with: {INSTALL}"
    return None


def devices(spec: Slice, slices: int = 1) -> list:
    """The jax devices of `slices` such slices (each device carries its slice_index)."""
    from jax.experimental import topologies

    kwargs: dict = {"chip_config_name": "megacore"} if spec.megacore else {}
    if spec.chips < 4:  # a host holds 2x2 chips by default; a one-chip slice is one host of one chip
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    if slices > 1:
        kwargs["num_slices"] = slices
    return list(topologies.get_topology_desc(topology_name=spec.topology, platform="tpu", **kwargs).devices)
