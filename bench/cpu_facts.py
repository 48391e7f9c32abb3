"""The CPU a benchmark ran on, as its JSON records it: model name and vector extensions."""

from __future__ import annotations

import contextlib

# The vector units that decide the GEMM and matrix-vector kernels' speed (AVX-512 and AMX change
# which library wins).
_VECTOR = ("avx2", "fma")
_VECTOR_PREFIXES = ("avx512f", "avx512_bf16", "amx")


def cpu_facts() -> dict:
    """{"cpu": /proc/cpuinfo's model name, "vector_extensions": the flags above it has}."""
    lines: list[str] = []
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        lines = f.readlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return {"cpu": cpu, "vector_extensions": sorted({x for x in flags if x.startswith(_VECTOR_PREFIXES) or x in _VECTOR})}
