"""Shared by the per-op micro-benchmarks in this folder: thread count, timing, onnxruntime
sessions built like the CPU fast path's, machine info (CPU model and flags) and JSON output.

Not a package: the scripts put this folder on sys.path (never the repository root, whose
builder/, runtime/ and kernels/ would shadow installed packages of those names)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
RESULTS = REPO / "benchmarks" / "results"

def physical_cores() -> int:
    """Physical cores this process may use: the runtime's own default thread count."""
    from llm_engine.runtime.cpu_info import cpu_info

    return cpu_info().physical_cores


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model and flags, library versions, threads: what a per-op number depends on."""
    from llm_engine.runtime.cpu_info import cpu_info, parse_cpuinfo

    cpu = cpu_info()
    try:
        cpus = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpus = []
    first = cpus[0] if cpus else {}
    info: dict[str, Any] = {
        "cpu": cpu.model, "simd_flags": list(cpu.flags), "isa": cpu.isa,
        "cpu_flags": first.get("flags") or first.get("Features") or "",
        "logical_cpus": os.cpu_count(), "usable_cpus": cpu.usable_cpus,
        "physical_cores": cpu.physical_cores, "threads": threads,
        "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    for name in ("torch", "onnxruntime", "onnx", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            info[name] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10)
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def cpu_line(machine: dict[str, Any], overhead: dict[str, float] | None = None) -> str:
    """One line for a table's heading: model, SIMD flags, threads, versions (and the fixed
    cost of an onnxruntime run, `ort_overhead_us`)."""
    line = (f"{machine['cpu']} ({machine['usable_cpus']} usable CPUs, "
            f"{machine['physical_cores']} physical cores), flags: "
            f"{' '.join(machine['simd_flags']) or '-'}; {machine['threads']} threads; "
            f"torch {machine['torch']}, onnxruntime {machine['onnxruntime']}")
    if overhead is not None:
        line += f"; an empty onnxruntime run: {overhead['median_us']:.1f} us"
    return line


def add_timing_args(p, *, warmup: int, reps: int, min_time: float, quick: str,
                    out: Path) -> None:
    """The options every per-op script takes: threads, how long to time, --quick, --out."""
    p.add_argument("--threads", type=int, default=physical_cores(),
                   help="torch and onnxruntime intra-op threads (default: physical cores)")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--reps", type=int, default=reps, help="at least this many timed calls")
    p.add_argument("--min-time", type=float, default=min_time,
                   help="and at least this many seconds of them per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--out", type=Path, default=out)


def _summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"median_us": statistics.median(times), "min_us": times[0],
            "p90_us": times[min(len(times) - 1, int(0.9 * len(times)))], "runs": len(times)}


def time_us(fn: Callable[[], Any], *, warmup: int, reps: int, min_time: float,
            max_reps: int = 100_000) -> dict[str, float]:
    """Median, min and p90 of single calls in microseconds, after `warmup` calls: at least
    `reps` calls and at least `min_time` seconds of them (up to `max_reps`)."""
    return time_many([fn], warmup=warmup, reps=reps, min_time=min_time, max_reps=max_reps)[0]


def time_many(fns: Sequence[Callable[[], Any]], *, warmup: int, reps: int, min_time: float,
              max_reps: int = 100_000) -> list[dict[str, float]]:
    """`time_us` of several functions, their calls interleaved (a, b, a, b, ...) so that each
    sees the same machine: on a shared CPU, load that comes and goes then slows all of them
    alike instead of whichever ran at the time. `min_time` is per function."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    clock = time.perf_counter_ns
    start = clock()
    budget = min_time * len(fns) * 1e9
    while len(times[0]) < max_reps and (len(times[0]) < reps or clock() - start < budget):
        for fn, ts in zip(fns, times):
            t0 = clock()
            fn()
            ts.append((clock() - t0) / 1e3)
    return [_summary(ts) for ts in times]


def ort_session(model_path: Path, threads: int, profile_prefix: str | None = None):
    """An onnxruntime session with the options `runtime.onnx_backend.OnnxRunner` uses (intra-op
    threads, one inter-op thread, all graph optimizations, spinning unless
    LLM_ENGINE_ORT_SPIN=0), so a lowering is measured as the fast path runs it; with
    `profile_prefix`, onnxruntime's per-node profiler on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spinning = os.environ.get("LLM_ENGINE_ORT_SPIN", "1") != "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def ort_overhead_us(threads: int, **timing) -> dict[str, float]:
    """The fixed cost of one session run: a one-element Neg, bound as the ops are. A per-op
    number here pays it on every call; the fast path pays it once per step for all ops."""
    import tempfile

    import torch
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "overhead",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    with tempfile.TemporaryDirectory(prefix="ops_overhead_") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        sess = ort_session(path, threads)
    x, y = torch.ones(1), torch.empty(1)
    io = sess.io_binding()
    bind(io, "x", x)
    bind(io, "y", y, output=True)
    return time_us(lambda: sess.run_with_iobinding(io), **timing)


def bind(io, name: str, t, output: bool = False) -> None:
    """Bind a contiguous CPU torch tensor to a session input or output by address."""
    import numpy as np
    import torch

    elem = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32,
            torch.int8: np.int8, torch.uint8: np.uint8}[t.dtype]
    assert t.is_contiguous(), name
    (io.bind_output if output else io.bind_input)(name, "cpu", 0, elem, list(t.shape),
                                                  t.data_ptr())


def runtime_ops(model) -> list[str]:
    """Op types of the nodes that depend on a graph input: what runs on every call (the rest
    works on initializers only and is folded once when the session loads). Identity, which
    onnxruntime removes, is left out."""
    live = {i.name for i in model.graph.input}
    ops = []
    for node in model.graph.node:
        if any(i in live for i in node.input):
            live.update(node.output)
            if node.op_type != "Identity":
                ops.append(node.op_type)
    return ops


def op_counts(ops: Sequence[str]) -> str:
    """["MatMul", "Mul", "Mul"] -> "MatMul, Mul x2" (in order of first use)."""
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return ", ".join(op if n == 1 else f"{op} x{n}" for op, n in counts.items())


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| in float64."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / max(float(want.norm()), 1e-30))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
