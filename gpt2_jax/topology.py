"""The devices of a Cloud TPU slice (or an NVIDIA GPU host) that this host does not have, for compiling
their programs here.

    python train.py --config configs/gpt2_124m.py --preflight --topology v5e-8 [--slices 2]
    python train.py --config configs/gpt2_124m.py --preflight --topology h100-8   # the gpu-compile extra

Names are Cloud TPU accelerator types, as `gcloud compute tpus tpu-vm create --accelerator-type`
takes them. Their number counts TensorCores: a v5e / v6e chip has one, so v5e-8 is 8 chips; a v4
or v5p chip has two, fused into one jax device ("megacore"), so v4-8 and v5p-8 are 4 devices.
`jax.experimental.topologies.get_topology_desc` builds the slice's devices from libtpu (the
`tpu` extra: `pip install -e ".[tpu]"`) without a chip; a mesh over them compiles the very
program a TPU VM of that type runs.

`h100-N` / `h200-N` are N GPUs of one host (N <= 8). XLA compiles for a GPU that is not there from a
description of it (`_GPU_SPECS`: NVIDIA's published SM count, memory and bandwidth; sm_90), with the
CUDA plugin and cuDNN from PyPI (`pip install -e ".[gpu-compile]"`) and no driver.

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
GPU_INSTALL = 'pip install -e ".[gpu-compile]"'

# What XLA's GPU compiler needs to know of a device (its GpuTargetConfig text format). Both are
# Hopper (compute capability 9.0, 132 SMs); H200 has more and faster memory. Memory sizes are what
# the devices report (81,559 MiB and 143,771 MiB).
_HOPPER = (
    "gpu_device_info {{ cuda_compute_capability {{ major: 9 minor: 0 }} threads_per_block_limit: 1024 "
    "threads_per_warp: 32 shared_memory_per_block: 49152 shared_memory_per_core: 233472 "
    "threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 "
    "block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800 "
    "clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448 }} "
    'platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 8 }} device_description_str: "{name}"'
)
_GPU_SPECS = {
    "h100": (81_559 << 20, _HOPPER.format(bandwidth=3_352_320_000_000, memory=81_559 << 20,
                                          name="NVIDIA H100 80GB HBM3")),
    "h200": (143_771 << 20, _HOPPER.format(bandwidth=4_800_000_000_000, memory=143_771 << 20, name="NVIDIA H200")),
}
# jax preallocates this fraction of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION): a step must fit in it.
GPU_MEMORY_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given, e.g. "v5e-8"
    generation: str  # "v4" | "v5e" | "v5p" | "v6e" | "h100" | "h200"
    chips: int  # devices per slice (GPUs per host)
    topology: str  # get_topology_desc's name, e.g. "v5e:2x4"; "8x1x1" for 8 GPUs
    hbm_bytes: int  # per device

    @property
    def platform(self) -> str:
        return "gpu" if self.generation in _GPU_SPECS else "tpu"

    @property
    def megacore(self) -> bool:
        return self.platform == "tpu" and GENERATIONS[self.generation].megacore

    @property
    def usable_bytes(self) -> int | None:
        """What a program may use of a device, where the compiler does not say it (GPU), else None."""
        return int(self.hbm_bytes * GPU_MEMORY_FRACTION) if self.platform == "gpu" else None


def known_names() -> str:
    """Examples of valid names, for error lines."""
    return ("v4-8..v4-8192, v5e-1/4/8/16/.../256 (or v5litepod-N), v5p-8..v5p-8192, v6e-1/4/8/.../256 "
            "(N counts TensorCores, two per v4 / v5p chip); h100-N, h200-N (N GPUs of one host, 1-8)")


def parse(name: str) -> Slice:
    """'v5e-8' -> Slice(v5e, 8 chips, 'v5e:2x4', 16 GiB), or ValueError naming the rule."""
    gpu = re.fullmatch(r"(h100|h200)-(\d+)", name.strip().lower())
    if gpu:
        count = int(gpu.group(2))
        if not 1 <= count <= 8:
            raise ValueError(f"--topology {name!r}: one host holds 1 to 8 GPUs; known: {known_names()}")
        return Slice(name, gpu.group(1), count, f"{count}x1x1", _GPU_SPECS[gpu.group(1)][0])
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
    if spec is not None and spec.platform == "tpu":
        env["TPU_ACCELERATOR_TYPE"] = spec.name.lower().replace("v5e-", "v5litepod-").replace("v6e-", "v6e-")
    for key, value in env.items():
        os.environ.setdefault(key, value)


def prepare(name: str) -> Slice:
    """What `--topology NAME` does before jax loads: the slice, its compiler checked, the environment
    set. Raises ValueError (one line: an unknown name, or the install command of a missing compiler)."""
    spec = parse(name)
    missing = compiler_missing(spec)
    if missing:
        raise ValueError(missing)
    prepare_environment(spec)
    return spec


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def compiler_missing(spec: Slice) -> str | None:
    """The error line when the compiler for `spec`'s platform is not installed, else None."""
    if spec.platform == "gpu":
        if not (_importable("jax_plugins.xla_cuda12") and _importable("nvidia.cudnn")):
            return (f"--topology {spec.name} needs XLA's CUDA compiler and cuDNN (jax-cuda12-plugin, "
                    f"nvidia-cudnn-cu12), which are not installed; install them with: {GPU_INSTALL}")
        return None
    if not _importable("libtpu"):
        return f"--topology needs libtpu, the TPU compiler, which is not installed; install it with: {INSTALL}"
    return None


def devices(spec: Slice, slices: int = 1) -> list:
    """The jax devices of `slices` such slices (each TPU device carries its slice_index)."""
    from jax.experimental import topologies

    if spec.platform == "gpu":
        if slices > 1:
            raise ValueError(f"--slices={slices}: multi-slice meshes are for TPU slices, not {spec.name}")
        return list(topologies.get_topology_desc(platform="cuda", topology_name="", topology=spec.topology,
                                                 target_config=_GPU_SPECS[spec.generation][1]).devices)

    kwargs: dict = {"chip_config_name": "megacore"} if spec.megacore else {}
    if spec.chips < 4:  # a host holds 2x2 chips by default; a one-chip slice is one host of one chip
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    if slices > 1:
        kwargs["num_slices"] = slices
    return list(topologies.get_topology_desc(topology_name=spec.topology, platform="tpu", **kwargs).devices)
