"""What the devices of the mesh in use are: the one answer every platform-dependent choice reads.

The attention `auto` picks, splash's interpret mode, cuDNN's rules and the MFU peak table all
depend on the hardware a program is built for. That is the mesh's devices, not the process's
default backend: `train.py --preflight --topology v5e-8` compiles a TPU program on a CPU host,
where `jax.default_backend()` says "cpu" but the mesh's devices are TPUs, and the program must be
the one a TPU VM would run.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

_GPU_NAMES = ("gpu", "cuda", "rocm")


class Platform(NamedTuple):
    name: str  # "tpu" | "gpu" | "cpu" (or another backend's own name)
    device_kind: str  # e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3", "cpu"


def _normal(name: str) -> str:
    return "gpu" if name in _GPU_NAMES else name


def of_devices(devices) -> Platform:
    """The platform of a collection of jax devices (the first one's: a mesh has one kind)."""
    device = next(iter(devices))
    return Platform(_normal(device.platform), device.device_kind)


def of_mesh(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> Platform:
    """The platform of `mesh`, or of the mesh in effect (`jax.set_mesh`), or else of jax's default
    backend. Works while tracing: an abstract mesh carries its devices' platform and kind."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if isinstance(mesh, jax.sharding.Mesh):
        return of_devices(mesh.devices.flat)
    if mesh is not None and not mesh.empty:
        device = getattr(mesh, "abstract_device", None)
        if device is not None:
            return Platform(_normal(device.platform), device.device_kind)
    return of_devices(jax.devices())


def current() -> str:
    """"tpu" | "gpu" | "cpu": the platform the program being traced or run is for (`of_mesh().name`)."""
    return of_mesh().name
