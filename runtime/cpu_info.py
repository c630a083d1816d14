"""What this machine's CPU is, read at load (never recorded in an engine): the model, the
cores this process may use (hyperthread siblings counted once) and the ISA flags that decide
which kernels torch and onnxruntime pick. The same engine directory runs on AVX2, AVX-512,
VNNI and AMX machines; onnxruntime dispatches its MLAS kernels by CPUID, and the runtime sizes
its thread pool from the physical cores (a second hyperthread on a core only adds contention
to memory-bound decode).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# The flags that decide which kernels torch and onnxruntime pick on x86 / Arm.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw",
             "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
             "amx_bf16", "asimd", "asimddp", "sve", "i8mm", "bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    usable_cpus: int  # logical CPUs in this process's affinity mask
    physical_cores: int  # of those, distinct cores
    flags: tuple[str, ...]  # the ISA_FLAGS this CPU has, in ISA_FLAGS order

    @property
    def isa(self) -> str:
        """The widest vector / matrix extensions, one word: what the GEMM kernels use."""
        has = set(self.flags)
        if {"amx_tile", "amx_int8"} <= has:
            return "amx"
        if "avx512_vnni" in has:
            return "avx512-vnni"
        if "avx512f" in has:
            return "avx512"
        if "avx_vnni" in has:
            return "avx2-vnni"
        if "avx2" in has:
            return "avx2"
        if "asimd" in has:
            return "neon-dotprod" if "asimddp" in has else "neon"
        return "baseline"


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU."""
    cpus = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                entry[key.strip()] = value.strip()
        if entry:
            cpus.append(entry)
    return cpus


def usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def describe(cpus: list[dict[str, str]], usable: set[int]) -> CpuInfo:
    first = cpus[0] if cpus else {}
    flags = set((first.get("flags") or first.get("Features") or "").split())
    cores = {(c.get("physical id"), c.get("core id")) for c in cpus
             if c.get("processor", "").isdigit() and int(c["processor"]) in usable
             and "core id" in c}
    model = first.get("model name") or platform.processor() or platform.machine() or "unknown"
    return CpuInfo(model, len(usable), len(cores) or len(usable) or 1,
                   tuple(f for f in ISA_FLAGS if f in flags))


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return describe(parse_cpuinfo(text), usable_cpus())
