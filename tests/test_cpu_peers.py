"""benchmarks/cpu_peers.py without any peer installed: the ratios, CPU flag parsing and the
llama.cpp ISA flags, the memory roofline of a tiny safetensors file, and a peer process that
crashes (a signal) or hangs becoming a skipped row."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "cpu_peers.py"

AVX2_CPUINFO = """\
processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
"""
# What the VM whose -march=native llama.cpp died with SIGILL advertised.
AMX_FLAGS = ("sse4_2 avx avx2 fma f16c bmi2 avx_vnni avx512f avx512cd avx512vl avx512dq "
             "avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16")


@pytest.fixture
def cp(monkeypatch):
    spec = importlib.util.spec_from_file_location("cpu_peers_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


# ---- ratios -----------------------------------------------------------------------------------
def test_ratios_new_targets(cp):
    R = cp.Result
    results = [
        R("llama.cpp", "Q4_1", batch1_tok_s=100.0, ttft_s=2.0),
        R("onnxruntime-genai", "int4", batch1_tok_s=200.0),
        R("llm-engine", "int4", batch1_tok_s=150.0, ttft_s=0.8),
        R("llm-engine", "int8-wo", batch1_tok_s=120.0, concurrent_tok_s=500.0),
        R("llm-engine", "int8-sq", concurrent_tok_s=1000.0),
        R("llm-engine", "fp32", batch1_tok_s=36.0, roofline_tok_s=40.0, ttft_s=3.0),
        R("HF transformers", "fp32", batch1_tok_s=20.0, concurrent_tok_s=400.0),
    ]
    r = cp.ratios(results)
    assert r["int4 / onnxruntime-genai int4, batch-1 tok/s"] == 0.75
    assert r["int4 / llama.cpp, batch-1 tok/s"] == 1.5
    assert r["int8 / llama.cpp, batch-1 tok/s"] == 1.2  # int8-wo counts as int8
    assert r["fp32 / memory roofline, batch-1 tok/s"] == 0.9
    assert r["int8-sq concurrent / HF fp32 batch, tok/s"] == 2.5
    assert r["int8 concurrent / HF fp32 batch, tok/s"] == 1.25
    assert r["int4 TTFT-512 / llama.cpp TTFT-512, s (lower is better)"] == 0.4
    assert r["fp32 TTFT-512 / llama.cpp TTFT-512, s (lower is better)"] == 1.5
    assert r["bf16 / HF bf16, batch-1 tok/s"] is None
    assert all("lower is better" in k for k in r if "TTFT" in k)
    assert list(r) == [spec.key for spec in cp.RATIO_SPECS]


def test_skipped_rows_make_no_ratio(cp):
    R = cp.Result
    results = [R("llama.cpp", "Q4_1", skipped="crashed: killed by SIGILL"),
               R("llm-engine", "int4", batch1_tok_s=150.0, ttft_s=0.8)]
    r = cp.ratios(results)
    assert r["int4 / llama.cpp, batch-1 tok/s"] is None
    assert r["int4 TTFT-512 / llama.cpp TTFT-512, s (lower is better)"] is None


# ---- CPU flags and the llama.cpp build -------------------------------------------------------
def test_cpu_flags_and_model(cp):
    flags = cp.cpu_flags(AVX2_CPUINFO)
    assert {"avx2", "fma", "f16c"} <= flags and "avx512f" not in flags
    assert cp.cpu_model(AVX2_CPUINFO) == "AMD EPYC"
    assert cp.cpu_flags("processor : 0\nFeatures : fp asimd sve\n") == {"fp", "asimd", "sve"}
    assert cp.cpu_flags("") == set()
    info = cp.machine_info(2, {"1": 10.0, "2": 18.0}, cpuinfo=f"flags : {AMX_FLAGS}\n")
    assert info["cpu_flags"] == {f: True for f in cp.RELEVANT_FLAGS}
    assert set(cp.RELEVANT_FLAGS) >= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                                      "amx_tile", "amx_int8", "amx_bf16", "avx_vnni", "fma",
                                      "f16c"}
    assert info["read_bandwidth_gbs"] == {"1": 10.0, "2": 18.0}
    assert "avx2" in cp.machine_line(info) and "18.0 GB/s (2 threads)" in cp.machine_line(info)


def test_ggml_flags_never_native_never_amx(cp):
    avx2 = cp.ggml_cmake_args(cp.cpu_flags(AVX2_CPUINFO))
    assert "-DGGML_NATIVE=OFF" in avx2
    assert {"-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AVX512=OFF"} <= set(avx2)

    amx = set(cp.ggml_cmake_args(set(AMX_FLAGS.split())))
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
            "-DGGML_AVX_VNNI=ON"} <= amx
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= amx
    assert not any("AMX" in a and a.endswith("=ON") for a in amx)

    # avx512f alone is not the set GGML_AVX512 compiles for: no AVX-512 then, nor its parts
    partial = set(cp.ggml_cmake_args({"avx2", "avx512f", "avx512_vnni"}))
    assert {"-DGGML_AVX512=OFF", "-DGGML_AVX512_VNNI=OFF"} <= partial


def test_install_steps(cp):
    steps = cp.install_steps(["llamacpp", "ortgenai"], set(AMX_FLAGS.split()))
    ort = next(s for s in steps if "onnxruntime-genai" in s.argv)
    assert "--no-deps" in ort.argv  # the engines' onnxruntime stays as installed
    build = next(s for s in steps if "CMAKE_ARGS" in s.env)
    assert "--no-binary" in build.argv and "--no-cache-dir" in build.argv
    assert "-DGGML_NATIVE=OFF" in build.env["CMAKE_ARGS"]
    assert "CMAKE_ARGS='-DGGML_NATIVE=OFF" in build.shell()
    assert cp.install_steps([], set()) == []


# ---- the memory roofline ----------------------------------------------------------------------
def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]]) -> None:
    """A safetensors file of zeros: name -> (dtype, shape, bytes per element)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape, size) in tensors.items():
        n = size
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_roofline_tied_and_untied(cp, tmp_path):
    tied, untied = tmp_path / "tied", tmp_path / "untied"
    tied.mkdir()
    untied.mkdir()
    layers = {"model.layers.0.mlp.down_proj.weight": ("F32", [8, 16], 4),
              "model.norm.weight": ("F32", [8], 4)}
    write_safetensors(tied / "weights.rank0.safetensors",
                      {"model.embed_tokens.weight": ("F32", [100, 8], 4), **layers})
    # quantized table parts count as the table; a separate head makes the table gathered
    write_safetensors(untied / "weights.rank0.safetensors",
                      {"model.embed_tokens.weight.int8": ("I8", [100, 8], 1),
                       "model.embed_tokens.weight.scale": ("F32", [100], 4),
                       "lm_head.weight.int8": ("I8", [100, 8], 1), **layers})
    wt = cp.engine_weight_bytes(tied)
    assert (wt.total, wt.embedding, wt.tied, wt.per_token) == (3744, 3200, True, 3744)
    wu = cp.engine_weight_bytes(untied)
    assert (wu.embedding, wu.tied) == (1200, False)
    assert wu.per_token == 544 + 800  # the layers and the head, not the table

    assert cp.roofline_tok_s(2 * 10**9, 23.0) == pytest.approx(11.5)
    r = cp.Result("llm-engine", "fp32", batch1_tok_s=3e6)
    cp.add_roofline(r, tied, bandwidth_gbs=23.0)
    assert r.weight_bytes_per_token == 3744
    assert r.roofline_tok_s == pytest.approx(23e9 / 3744, abs=0.01)
    assert r.roofline_fraction == round(3e6 / r.roofline_tok_s, 3)
    row = cp.table_rows([r])[0]
    assert row[-4:] == ["0.0", f"{r.roofline_tok_s:.1f}", f"{r.roofline_fraction:.0%}", "-"]

    missing = cp.Result("llm-engine", "int4", skipped="crashed")
    cp.add_roofline(missing, tmp_path, bandwidth_gbs=23.0)  # no weights file: a note, no crash
    assert missing.roofline_tok_s is None and missing.notes[0].startswith("no roofline")


def test_read_bandwidth_runs(cp):
    assert cp.read_bandwidth_gbs(1, mib=4, reps=1) > 0


# ---- peers in their own processes -------------------------------------------------------------
DYING_PEER = """\
import os, resource, signal, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
print("loading libllama.so", file=sys.stderr, flush=True)
os.kill(os.getpid(), signal.SIGILL)
"""
GOOD_PEER = """\
import json, os, sys
out = sys.argv[sys.argv.index("--json-out") + 1]
json.dump({"precision": "Q4_1", "batch1_tok_s": 12.5, "unknown_field": 1,
           "notes": [os.getcwd(), os.environ.get("PYTHONPATH") or "", sys.path[0]]},
          open(out, "w"))
"""


def fake_peers(cp, monkeypatch, tmp_path, **scripts: str) -> None:
    for name, text in scripts.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.setattr(cp, "PEERS_DIR", tmp_path)


def test_signal_becomes_skipped_row(cp, monkeypatch, tmp_path):
    fake_peers(cp, monkeypatch, tmp_path, dying=DYING_PEER)
    s = cp.Settings(threads=1, max_tokens=2)
    r = cp.run_peer(cp.PeerJob("llama.cpp", "Q4_1", "dying.py"), s)
    assert r.skipped.startswith("crashed: killed by SIGILL")
    assert "exit -4" in r.skipped and "loading libllama.so" in r.skipped
    assert any("--install-peers" in n for n in r.notes)
    assert r.batch1_tok_s is None
    assert cp.describe_exit(3) == "exit 3"
    assert cp.describe_exit(-signal.SIGSEGV).startswith("killed by SIGSEGV")


def test_timeout_becomes_skipped_row(cp, monkeypatch, tmp_path):
    fake_peers(cp, monkeypatch, tmp_path, slow="import time\ntime.sleep(60)\n")
    s = cp.Settings(threads=1, max_tokens=2, peer_timeout=0.5)
    r = cp.run_peer(cp.PeerJob("HF transformers", "fp32", "slow.py"), s)
    assert r.skipped.startswith("timed out after 0.5s: killed by SIGKILL")


def test_peer_result_and_hygiene(cp, monkeypatch, tmp_path):
    fake_peers(cp, monkeypatch, tmp_path, good=GOOD_PEER, silent="pass\n")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    s = cp.Settings(threads=1, max_tokens=2)
    r = cp.run_peer(cp.PeerJob("llama.cpp", "?", "good.py"), s)
    assert (r.skipped, r.precision, r.batch1_tok_s) == (None, "Q4_1", 12.5)
    cwd, pythonpath, first_path = r.notes
    assert not Path(cwd).resolve().is_relative_to(REPO)  # the repo's folders cannot shadow
    assert pythonpath == ""
    assert Path(first_path or ".").resolve() != tmp_path.resolve()  # -P: no script dir
    r = cp.run_peer(cp.PeerJob("llama.cpp", "Q4_1", "silent.py"), s)
    assert r.skipped.startswith("crashed: exit 0") and "without writing" in r.skipped


def test_real_peer_script_skips_without_the_project(cp, tmp_path):
    """benchmarks/peers/engine.py on a folder that is not an engine: a skip written as JSON
    by a process started the way the parent starts it (-P, cwd outside the repository)."""
    s = cp.Settings(threads=1, max_tokens=2, concurrent=False)
    r = cp.run_peer(cp.PeerJob("llm-engine", "fp32", "engine.py",
                               ["--engine-dir", str(tmp_path), "--precision", "fp32"]), s)
    assert r.skipped and "not an engine directory" in r.skipped


def test_repo_modules_flags_the_project(cp, tmp_path):
    C = cp.C

    class Mod:
        def __init__(self, path: Path) -> None:
            self.__file__ = str(path)

    mods = {"kernels": Mod(REPO / "kernels" / "__init__.py"),
            "_peer_common": Mod(REPO / "benchmarks" / "peers" / "_common.py"),
            "transformers": Mod(tmp_path / "site-packages" / "transformers" / "__init__.py"),
            "builtin": object()}
    assert C.repo_modules(mods) == ["kernels"]


def test_run_main_refuses_a_leaky_peer(cp, monkeypatch, tmp_path):
    C = cp.C
    out = tmp_path / "r.json"
    C.run_main(C.parser("t"), lambda a: C.Measurement(batch1_tok_s=1.0),
               project_allowed=True, argv=["--json-out", str(out)])
    assert json.loads(out.read_text())["batch1_tok_s"] == 1.0

    def skip(args):
        raise C.Skip("not installed: pip install x")

    monkeypatch.setattr(C, "repo_modules", lambda: [])
    C.run_main(C.parser("t"), skip, argv=["--json-out", str(out)])
    assert json.loads(out.read_text())["skipped"] == "not installed: pip install x"
    monkeypatch.setattr(C, "repo_modules", lambda: ["kernels"])
    with pytest.raises(RuntimeError, match="kernels"):
        C.run_main(C.parser("t"), lambda a: C.Measurement(), argv=["--json-out", str(out)])


def test_markdown_has_machine_and_roofline(cp):
    r = cp.Result("llm-engine", "fp32", batch1_tok_s=30.0, weight_bytes_per_token=538_000_000,
                  roofline_tok_s=42.8, roofline_fraction=0.701)
    machine = cp.machine_info(2, {"1": 15.0, "2": 23.0}, cpuinfo=AVX2_CPUINFO)
    settings = {"max_tokens": 16, "concurrency": 64, "ttft_tokens": 512}
    md = cp.markdown({"settings": settings, "machine": machine, "ratios": cp.ratios([r]),
                      "results_objs": [r]})
    assert "flags: avx2 fma f16c" in md and "23.0 GB/s (2 threads)" in md
    assert "| llm-engine | fp32 | 30.0 | - | - | 538.0 | 42.8 | 70% |" in md
    assert "| fp32 / memory roofline, batch-1 tok/s | 0.70 |" in md


def test_ratios_and_missing_peer_skip(cp, monkeypatch):
    m = cp
    R = m.Result
    results = [
        R("llama.cpp", "Q4_1", batch1_tok_s=100.0),
        R("llm-engine", "int4", batch1_tok_s=150.0),
        R("llm-engine", "int8", batch1_tok_s=50.0, concurrent_tok_s=800.0),
        R("llm-engine", "bf16", batch1_tok_s=30.0, concurrent_tok_s=300.0),
        R("HF transformers", "fp32", batch1_tok_s=20.0, concurrent_tok_s=400.0),
        R("HF transformers", "bf16", skipped="not installed: pip install transformers"),
    ]
    r = m.ratios(results)
    assert r["int4 / llama.cpp, batch-1 tok/s"] == 1.5
    assert r["int8 / llama.cpp, batch-1 tok/s"] == 0.5
    assert r["int8 concurrent / HF fp32 batch, tok/s"] == 2.0
    assert r["fp32 / HF fp32, batch-1 tok/s"] is None  # no llm-engine fp32 in this run
    assert r["bf16 / HF bf16, batch-1 tok/s"] is None  # HF bf16 skipped: no number, no ratio
    assert r["bf16 concurrent / HF bf16 batch, tok/s"] is None
    assert set(r) == {key for key, *_ in m.RATIO_SPECS}

    # A missing peer package is a skip entry with the install command, not an exception.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    res = m.guarded("llama.cpp", "Q4_1", lambda: m.run_llamacpp(m.Settings(threads=1)))
    assert res.skipped == "not installed: pip install llama-cpp-python"
    assert res.batch1_tok_s is None
    assert m.ratios([*results[1:], res])["int4 / llama.cpp, batch-1 tok/s"] is None
