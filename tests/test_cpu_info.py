"""The machine description the runtime reads at load: cores counted once per hyperthread
pair, the ISA word from the flags, the default thread count from the physical cores."""

from __future__ import annotations

from llm_engine.runtime import cluster
from llm_engine.runtime.backend import describe_backend
from llm_engine.runtime.cpu_info import CpuInfo, cpu_info, describe, parse_cpuinfo


def _cpuinfo(n: int, siblings: int, flags: str) -> str:
    """n logical CPUs, `siblings` hyperthreads per core."""
    return "\n\n".join(f"processor\t: {i}\nmodel name\t: Test CPU\nphysical id\t: 0\n"
                       f"core id\t\t: {i // siblings}\nflags\t\t: {flags}" for i in range(n))


def test_hyperthreads_count_once_and_only_usable_cpus_count():
    cpus = parse_cpuinfo(_cpuinfo(8, 2, "fpu sse4_2 avx avx2 fma f16c"))
    info = describe(cpus, usable=set(range(8)))
    assert (info.usable_cpus, info.physical_cores, info.isa) == (8, 4, "avx2")
    assert describe(cpus, usable={0, 1, 2}).physical_cores == 2  # cores 0 and 1
    assert info.flags == ("sse4_2", "avx", "avx2", "fma", "f16c")


def test_isa_word_is_the_widest_extension():
    def isa(flags: str) -> str:
        return describe(parse_cpuinfo(_cpuinfo(2, 1, flags)), {0, 1}).isa

    assert isa("avx2 fma avx512f avx512bw avx512vl avx512_vnni amx_tile amx_int8") == "amx"
    assert isa("avx2 avx512f avx512_vnni") == "avx512-vnni"
    assert isa("avx2 avx512f") == "avx512"
    assert isa("avx2 avx_vnni") == "avx2-vnni"
    assert isa("sse4_2") == "baseline"
    assert isa("fp asimd asimddp") == "neon-dotprod"


def test_no_cpuinfo_still_describes_the_machine():
    info = describe([], usable={0, 1, 2})
    assert info.physical_cores == 3 and info.isa == "baseline"


def test_default_threads_are_the_physical_cores(monkeypatch):
    fake = CpuInfo("Test CPU", usable_cpus=8, physical_cores=4, flags=("avx2",))
    monkeypatch.setattr(cluster, "cpu_info", lambda: fake)
    assert cluster.default_threads(1) == 4
    assert cluster.default_threads(2) == 2 and cluster.default_threads(8) == 1


def test_backend_line_names_what_was_chosen():
    cpu = cpu_info()
    line = describe_backend({"backend": "onnx", "device": "cpu", "cpu": cpu.model,
                             "isa": cpu.isa, "physical_cores": str(cpu.physical_cores),
                             "onnxruntime": "1.32.0", "threads": "2", "spinning": "on"})
    assert line == (f"onnx (onnxruntime 1.32.0, 2 threads, spinning on; {cpu.model}, "
                    f"{cpu.physical_cores} cores, {cpu.isa})")
    assert describe_backend({"backend": "triton", "device": "cuda:0"}) == "triton on cuda:0"
