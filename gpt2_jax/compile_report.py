"""What the compiler says about one program: memory per device, FLOPs, bytes accessed, Mosaic kernels.

Programs are lowered from abstract inputs (jax.ShapeDtypeStruct with shardings), so nothing is
allocated, and their devices may be a TPU slice this host does not have (gpt2_jax/topology.py). Two
facts about XLA:TPU shape `Compiled`: a program bigger than a chip's HBM fails to compile
(RESOURCE_EXHAUSTED, naming the bytes it needed), so "fits" is "compiles" and a refusal still gives
a size; Pallas kernels compiled by Mosaic appear as `tpu_custom_call` instructions (their FLOPs are
not in XLA's cost analysis).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# XLA:TPU's out-of-memory messages, two forms seen (sizes in binary units: 15.75G of a 16 GiB chip).
_TEMP_OVER = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_USED_OF = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")


@dataclasses.dataclass
class Compiled:
    """One program's compile: its memory per device (peak = arguments + outputs not aliased to them
    + temporaries + code), or the compiler's out-of-memory refusal with what it said it needed."""

    fits: bool
    compile_s: float
    peak_bytes: int | None = None
    temp_bytes: int | None = None
    argument_bytes: int | None = None
    usable_bytes: int | None = None  # what the compiler said a device can hold (OOM messages only)
    mosaic_kernels: int = 0  # Pallas kernels compiled by Mosaic (TPU)
    cudnn_attention: int = 0  # cuDNN fused-attention calls, forward and backward (GPU)
    flops: float | None = None  # per device, this program as compiled (loops counted once)
    bytes_accessed: float | None = None
    error: str = ""

    def fits_in(self, limit: int | None) -> bool:
        """Built, and its peak within `limit` bytes per device (None: no limit). XLA:TPU refuses a program
        by its temporaries alone: it was seen to build one whose arguments took its peak past the HBM."""
        return self.fits and (limit is None or (self.peak_bytes is not None and self.peak_bytes <= limit))


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def measure(build: Callable[[], Any]) -> Compiled:
    """Runs `build()` (a lower(...).compile() of abstract inputs) and reads its figures; an
    out-of-memory refusal is an answer too. Any other compile error is raised."""
    start = time.perf_counter()
    try:
        compiled = build()
    except Exception as e:  # noqa: BLE001 - only out-of-memory is an answer; anything else is re-raised
        if not is_out_of_memory(e):
            raise
        return _refused(e, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    out = Compiled(fits=True, compile_s=seconds)
    memory = compiled.memory_analysis()
    if memory is not None:  # None where a backend does not report it
        # The state is donated: outputs alias arguments, so they are counted once.
        out.peak_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                             + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
        out.temp_bytes = int(memory.temp_size_in_bytes)
        out.argument_bytes = int(memory.argument_size_in_bytes)
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    if cost:
        out.flops = float(cost["flops"]) if "flops" in cost else None
        out.bytes_accessed = float(cost["bytes accessed"]) if "bytes accessed" in cost else None
    text = compiled.as_text()
    out.mosaic_kernels = text.count('custom_call_target="tpu_custom_call"')
    out.cudnn_attention = text.count('custom_call_target="__cudnn$fmha')
    return out


def _refused(error: Exception, seconds: float) -> Compiled:
    text = str(error)
    out = Compiled(fits=False, compile_s=seconds, error=text.strip().splitlines()[0][:300])
    if match := _TEMP_OVER.search(text):
        out.temp_bytes = _bytes(*match.group(1, 2))
        out.usable_bytes = _bytes(*match.group(3, 4))
    elif match := _USED_OF.search(text):
        out.peak_bytes = _bytes(*match.group(1, 2))
        out.usable_bytes = _bytes(*match.group(3, 4))
    return out


def human_bytes(n: float) -> str:
    """1.5 * 2**30 -> '1.50 GiB'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of jax.ShapeDtypeStruct with shardings (evenly split)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree_util.tree_leaves(tree))
