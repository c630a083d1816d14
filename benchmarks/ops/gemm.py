#!/usr/bin/env python
"""Per-op benchmark: one GEMM (`linear` node) of each weight format, on its own, on the CPU.

For every format of `kernels.formats`, weight shape N x K and row count M, it times

* torch: the format's reference `formats.get(name).linear` (what `--kernels reference` runs;
  the CPU path it took, as `kernels.cpu_kernels` records it, is in the JSON), and
* ort: the format's ONNX lowering as the CPU fast path runs it. The graph is emitted by the
  exporter itself (`builder.onnx_export._Emitter`, through its `op_linear` and the format's
  `LINEAR` entry) from a three-node plan (input x [1, T, K], the weight parts, linear), the
  parts stored in a safetensors file the graph points into, as an engine's are; the session
  has the fast path's options (`runtime.onnx_backend.OnnxRunner`) and x / y are bound by
  address, as there. Conversions on the weight alone (transposes, int8 -> uint8 codes, fp8
  dequantized to fp32) are folded by onnxruntime when the session loads and are not timed.

Each number is the median of single calls after a warm-up, the two paths' calls interleaved
(load on a shared machine then slows both alike; the JSON also has min and p90). The two
paths run on the same inputs and their outputs are compared (`rel_err`: ||ort - torch|| /
||torch||), so the benchmark also shows that both compute the same thing. GB/s counts the
weight bytes of the format as stored (what a GEMM has to read at least); GFLOP/s counts
2·M·N·K.

    python -P benchmarks/ops/gemm.py [--formats dense int4_group ...] [--m 1 16 64 512] \
        [--shapes 576x576 1536x576 576x1536] [--threads N] [--group-size 128] \
        [--int4-zeros float|uint8] [--quick] [--out benchmarks/results/ops_gemm.json]

Defaults: every format, SmolLM2-135M's GEMM shapes (q/o projection 576x576, gate/up 1536x576,
down 576x1536), threads = physical cores. Group sizes follow the builder's choice for each K
(`builder.quant.config`: int4 `group_size_for`, fp8 per-token-group `fp8_group_for`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

# This folder, never the repository root (module docstring of common.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

DEFAULT_SHAPES = ("576x576", "1536x576", "576x1536")
DEFAULT_M = (1, 16, 64, 512)
DEFAULT_OUT = common.RESULTS / "ops_gemm.json"


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not NxK (e.g. 576x1536)") from None
    if n < 1 or k < 2 or k % 2:
        raise argparse.ArgumentTypeError(f"shape {text!r}: N >= 1 and an even K >= 2")
    return n, k


def group_for(fmt_name: str, k: int, requested: int) -> int | None:
    """The group size the builder would give this format at K input channels."""
    from llm_engine.builder.quant.config import fp8_group_for, group_size_for

    if fmt_name == "int4_group":
        return group_size_for(k, requested)
    if fmt_name == "fp8_channel_a8_group":
        return fp8_group_for(k, requested)
    return None


def make_parts(fmt, w, x_calib, group: int | None, integer_zeros: bool) -> list:
    """The stored parts of W in `fmt`, calibrated parts (fp8's static x scale) from x_calib."""
    import torch

    if fmt.quantize is None:
        return [w]
    parts = fmt.quantize(w, group_size=group, integer_zeros=integer_zeros)
    if fmt.name == "fp8_channel_a8":  # static activation scale: amax over the calibration rows
        parts.append(torch.tensor([float(x_calib.abs().max()) / 448.0]))
    assert len(parts) == fmt.operands, fmt.name
    return parts


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def export_linear(fmt, parts, n: int, k: int, group: int | None, folder: Path):
    """The format's lowering, emitted by the exporter from a one-linear plan, saved as
    folder/model.onnx next to folder/weights.safetensors. Returns (model, lowering name)."""
    from onnx import TensorProto, helper
    from safetensors.torch import save_file

    from llm_engine.builder.onnx_export import OPSET, _Emitter, _live

    weights = {f"w.{p.suffix or 'weight'}": t.contiguous() for p, t in zip(fmt.parts, parts)}
    save_file(weights, str(folder / "weights.safetensors"))
    x = {"name": "x", "op": "input", "inputs": [], "attrs": {"name": "x"},
         "shape": [1, "T", k], "dtype": "float32"}
    nodes = [x] + [{"name": f"{key}.node", "op": "weight", "inputs": [], "attrs": {"name": key},
                    "shape": list(t.shape), "dtype": _dtype_name(t)}
                   for key, t in weights.items()]
    attrs: dict[str, Any] = {"b_format": fmt.name}
    if fmt.grouped:
        attrs["group_size"] = group
    nodes.append({"name": "y", "op": "linear", "inputs": [nd["name"] for nd in nodes],
                  "attrs": attrs, "shape": [1, "T", n], "dtype": "float32"})
    plan = {"inputs": [{"name": "x", "node": "x", "shape": x["shape"], "dtype": "float32"}],
            "outputs": ["y"], "kv_cache": {"layers": []}, "nodes": nodes}
    em = _Emitter(plan, folder / "weights.safetensors")
    for node in nodes:
        em.emit(node)
    em.onnx_nodes.append(helper.make_node("Identity", [em.values["y"]], ["y"]))
    graph = helper.make_graph(_live(em.onnx_nodes, ["y"]), f"linear_{fmt.name}",
                              em.graph_inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              em.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    (kind,) = em.lowerings
    return model, kind


def torch_path(fmt_name: str) -> str:
    """The CPU path the reference took for this format's op, as the kernels record it
    (`kernels.cpu_kernels.KERNELS.paths`, `kernels.quant.PATHS` before that module)."""
    import importlib

    op = _QUANT_OP.get(fmt_name)
    if op is None:
        return "F.linear"
    for module, attr in (("cpu_kernels", "KERNELS"), ("quant", None)):
        try:
            mod = importlib.import_module(f"llm_engine.kernels.{module}")
        except ImportError:
            continue
        paths = getattr(getattr(mod, attr), "paths", None) if attr else getattr(mod, "PATHS",
                                                                                 None)
        if paths and op in paths:
            return paths[op]
    return "?"


# format -> the op whose CPU path the kernels record
_QUANT_OP = {"int8_channel": "int8_linear", "int4_group": "int4_linear",
             "int8_channel_a8": "int8_a8_linear", "fp8_channel_a8": "fp8_a8_linear",
             "fp8_channel_a8_token": "fp8_a8_token_linear",
             "fp8_channel_a8_group": "fp8_a8_group_linear"}


def bench_m(fmt, parts, w, x, group, sess, args) -> dict[str, Any]:
    """Both paths at one row count: timings and how far apart their outputs are."""
    import torch
    import torch.nn.functional as F

    m, n = x.shape[1], w.shape[0]
    timing = dict(warmup=args.warmup, reps=args.reps, min_time=args.min_time)

    def torch_call():
        return fmt.linear(x, *parts, group_size=group)

    y = torch.empty(1, m, n)
    io = sess.io_binding()
    common.bind(io, "x", x)
    common.bind(io, "y", y, output=True)

    def ort_call():
        sess.run_with_iobinding(io)

    want = torch_call()
    ort_call()
    got = y.clone()
    t_torch, t_ort = common.time_many([torch_call, ort_call], **timing)
    exact = F.linear(x, w)
    return {"torch": t_torch, "ort": t_ort,
            "rel_err_ort_vs_torch": common.rel_err(got, want),
            "rel_err_torch_vs_fp32": common.rel_err(want, exact),
            "rel_err_ort_vs_fp32": common.rel_err(got, exact)}


def bench_format(name: str, shapes, ms, args, x_all, gen) -> list[dict[str, Any]]:
    import torch

    from llm_engine.kernels import formats

    fmt = formats.get(name)
    rows = []
    for n, k in shapes:
        group = group_for(name, k, args.group_size)
        w = torch.randn(n, k, generator=gen) * k**-0.5
        x_k = x_all[k]
        parts = make_parts(fmt, w, x_k, group, args.int4_zeros == "uint8")
        weight_bytes = sum(t.numel() * t.element_size() for t in parts)
        with tempfile.TemporaryDirectory(prefix="ops_gemm_") as tmp:
            model, kind = export_linear(fmt, parts, n, k, group, Path(tmp))
            sess = common.ort_session(Path(tmp) / "model.onnx", args.threads)
            ops = common.op_counts(common.runtime_ops(model))
            for m in ms:
                res = bench_m(fmt, parts, w, x_k[:, :m].contiguous(), group, sess, args)
                row = {"format": name, "M": m, "N": n, "K": k, "group_size": group,
                       "weight_bytes": weight_bytes, **res, "torch_path": torch_path(name),
                       "ort_lowering": kind, "ort_ops": ops}
                for path in ("torch", "ort"):
                    us = row[path]["median_us"]
                    row[f"gbps_{path}"] = weight_bytes / us / 1e3
                    row[f"gflops_{path}"] = 2.0 * m * n * k / us / 1e3
                rows.append(row)
                print(f"  {name:22s} M={m:4d} {n}x{k}: torch {row['torch']['median_us']:9.1f} "
                      f"us, ort {row['ort']['median_us']:9.1f} us, rel err "
                      f"{row['rel_err_ort_vs_torch']:.1e}", file=sys.stderr, flush=True)
    return rows


HEADER = ("format", "M", "N x K", "torch us", "ort us", "ort speedup",
          "GB/s torch / ort", "GFLOP/s torch / ort", "rel err")


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        t, o = r["torch"]["median_us"], r["ort"]["median_us"]
        body.append((r["format"], r["M"], f"{r['N']}x{r['K']}", common.fmt(t), common.fmt(o),
                     f"{t / o:.2f}x",
                     f"{common.fmt(r['gbps_torch'])} / {common.fmt(r['gbps_ort'])}",
                     f"{common.fmt(r['gflops_torch'])} / {common.fmt(r['gflops_ort'])}",
                     f"{r['rel_err_ort_vs_torch']:.1e}"))
    return common.markdown_table(HEADER, body)


def pivot_table(rows: list[dict[str, Any]]) -> str:
    """The medians again, one line per format and shape: "torch / ort" us at each M."""
    ms = sorted({r["M"] for r in rows})
    lines: dict[tuple, dict[int, str]] = {}
    for r in rows:
        cell = f"{common.fmt(r['torch']['median_us'], 0)} / {common.fmt(r['ort']['median_us'], 0)}"
        lines.setdefault((r["format"], f"{r['N']}x{r['K']}"), {})[r["M"]] = cell
    return common.markdown_table(
        ("format", "N x K", *(f"M={m}: torch / ort us" for m in ms)),
        [(*key, *(cells.get(m, "-") for m in ms)) for key, cells in lines.items()])


def lowerings_table(rows: list[dict[str, Any]]) -> str:
    seen: dict[str, tuple] = {}
    for r in rows:
        seen.setdefault(r["format"], (r["format"], r["torch_path"], r["ort_lowering"],
                                      r["ort_ops"]))
    return common.markdown_table(("format", "torch path", "ONNX lowering",
                                  "ops run per call"), list(seen.values()))


def parse_args(argv=None) -> argparse.Namespace:
    from llm_engine.kernels import formats

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=list(formats.FORMATS),
                   choices=list(formats.FORMATS))
    p.add_argument("--m", type=int, nargs="+", default=list(DEFAULT_M),
                   help="rows (tokens) per GEMM (default: 1 16 64 512)")
    p.add_argument("--shapes", type=parse_shape, nargs="+",
                   default=[parse_shape(s) for s in DEFAULT_SHAPES],
                   help="weight shapes NxK (default: SmolLM2-135M's 576x576 1536x576 576x1536)")
    p.add_argument("--group-size", type=int, default=128,
                   help="requested group size (int4, fp8 per-token-group), as the builder's "
                        "--group-size: smaller where it does not divide K")
    p.add_argument("--int4-zeros", choices=("float", "uint8"), default="float",
                   help="int4 zero points: float (the builder's default) or uint8 (older engines)")
    common.add_timing_args(p, warmup=5, reps=20, min_time=0.2, out=DEFAULT_OUT,
                           quick="smoke test: the first shape, M = 1, a few calls")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.m = args.shapes[:1], [1]
        args.warmup, args.reps, args.min_time = 1, 3, 0.0
    if min(args.m) < 1 or args.threads < 1 or args.reps < 1:
        p.error("--m, --threads and --reps must be >= 1")
    return args


def main(argv=None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    # one activation tensor per K, its first M rows used at each M
    x_all = {k: torch.randn(1, max(args.m), k, generator=gen)
             for k in sorted({k for _, k in args.shapes})}
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with torch.inference_mode():
        for name in args.formats:
            if name.startswith("fp8") and not hasattr(torch, "float8_e4m3fn"):
                skipped[name] = "torch has no float8_e4m3fn"
                continue
            rows += bench_format(name, args.shapes, args.m, args, x_all, gen)
    machine = common.machine_info(args.threads)
    overhead = common.ort_overhead_us(args.threads, warmup=args.warmup, reps=args.reps,
                                      min_time=args.min_time)
    payload = {
        "benchmark": "ops/gemm",
        "command": "python -P benchmarks/ops/gemm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "ort_run_overhead": overhead,
        "config": {"formats": args.formats, "m": args.m,
                   "shapes": [f"{n}x{k}" for n, k in args.shapes],
                   "group_size": args.group_size, "int4_zeros": args.int4_zeros,
                   "warmup": args.warmup, "reps": args.reps, "min_time_s": args.min_time,
                   "seed": args.seed, "quick": args.quick},
        "skipped": skipped,
        "rows": rows,
    }
    common.write_json(args.out, payload)
    print(f"{common.cpu_line(machine, overhead)}\n\n{table(rows)}\n\n{pivot_table(rows)}\n\n"
          f"{lowerings_table(rows)}")
    print(f"wrote {args.out}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
