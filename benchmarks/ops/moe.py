#!/usr/bin/env python
"""Per-op benchmark: a mixture-of-experts block's experts (`moe`) on the CPU, three ways on
the same inputs:

* torch: `kernels.ops.moe`, the reference (what `--kernels reference` runs): each expert
  on the tokens routed to it.
* ort dense: the exporter's dense lowering (`builder.onnx_moe.MoeOps.moe_dense`): every
  expert on every token in one batched MatMul, summed with the routing weights.
* ort contrib: the exporter's lowering onto onnxruntime's `com.microsoft.MoE`
  (`MoeOps.moe_contrib`): only the routed experts run.

Both ONNX graphs come from the exporter itself, from a one-node plan, and run as the fast
path runs them. Routing is random, top-k of a softmax. `rel err` is ||ort - torch|| / ||torch||.

    python -P benchmarks/ops/moe.py [--experts 8 --top-k 2 --hidden 512 --inter 1408] \
        [--tokens 1 16 64] [--threads N] [--quick] [--out benchmarks/results/ops_moe.json]

Defaults: Mixtral's routing (8 experts, top-2) at a quarter of its width, fp32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DEFAULT_OUT = common.RESULTS / "ops_moe.json"


def export_moe(lowering: str, e: int, k: int, h: int, i: int, folder: Path, weights: dict):
    """The exporter's `moe` lowering (`dense` or `contrib`) of a one-node plan."""
    from onnx import TensorProto, helper
    from safetensors.torch import save_file

    from llm_engine.builder.onnx_export import OPSET, _Emitter, _live

    save_file(weights, str(folder / "weights.safetensors"))

    def node(name, op, inputs, shape, dtype="float32", attrs=None):
        return {"name": name, "op": op, "inputs": inputs, "attrs": attrs or {}, "shape": shape,
                "dtype": dtype}

    nodes = [node("x", "input", [], ["T", h], attrs={"name": "x"}),
             node("index", "input", [], ["T", k], "int64", {"name": "index"}),
             node("w", "input", [], ["T", k], attrs={"name": "w"}),
             node("gate_up", "weight", [], [e, 2 * i, h], attrs={"name": "gate_up"}),
             node("down", "weight", [], [e, h, i], attrs={"name": "down"}),
             node("y", "moe", ["x", "index", "w", "gate_up", "down"], ["T", h],
                  attrs={"act": "silu"})]
    plan = {"inputs": [{"name": n["name"], "node": n["name"], "shape": n["shape"],
                        "dtype": n["dtype"]} for n in nodes[:3]],
            "outputs": ["y"], "kv_cache": {"layers": []}, "nodes": nodes}
    em = _Emitter(plan, folder / "weights.safetensors")
    em.MOE_LOWERING = "auto" if lowering == "contrib" else "dense"
    for n in nodes:
        em.emit(n)
    em.onnx_nodes.append(helper.make_node("Identity", [em.values["y"]], ["y"]))
    graph = helper.make_graph(_live(em.onnx_nodes, ["y"]), f"moe_{lowering}", em.graph_inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              em.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    path = folder / f"{lowering}.onnx"
    path.write_bytes(model.SerializeToString())
    assert f"moe_{lowering}" in em.lowerings, em.lowerings
    return path


def main(argv=None) -> dict[str, Any]:
    import torch

    from llm_engine.kernels.ops import OPS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    common.add_timing_args(p, warmup=3, reps=10, min_time=0.3, out=DEFAULT_OUT,
                           quick="smoke test: tiny shapes, a few calls")
    args = p.parse_args(argv)
    if args.quick:
        args.experts, args.top_k, args.hidden, args.inter = 4, 2, 32, 48
        args.tokens, args.warmup, args.reps, args.min_time = [1, 5], 1, 3, 0.0
    torch.set_num_threads(args.threads)
    e, k, h, i = args.experts, args.top_k, args.hidden, args.inter
    g = torch.Generator().manual_seed(args.seed)
    weights = {"gate_up": torch.randn(e, 2 * i, h, generator=g) * h ** -0.5,
               "down": torch.randn(e, h, i, generator=g) * i ** -0.5}
    rows = []
    with tempfile.TemporaryDirectory(prefix="ops_moe_") as tmp:
        sessions = {lw: common.ort_session(export_moe(lw, e, k, h, i, Path(tmp), weights),
                                           args.threads) for lw in ("dense", "contrib")}
        for t in args.tokens:
            x = torch.randn(t, h, generator=g)
            probs = torch.randn(t, e, generator=g).softmax(-1)
            index = probs.topk(k).indices
            w = probs.gather(-1, index)
            want = OPS["moe"].fn(x, index, w, weights["gate_up"], weights["down"], act="silu")
            outs: dict[str, Any] = {}
            calls = [lambda x=x, index=index, w=w: OPS["moe"].fn(
                x, index, w, weights["gate_up"], weights["down"], act="silu")]
            for lw, sess in sessions.items():
                out = torch.empty(t, h)
                io = sess.io_binding()
                for name, val in (("x", x), ("index", index), ("w", w)):
                    common.bind(io, name, val.contiguous())
                common.bind(io, "y", out, output=True)
                outs[lw] = out
                calls.append(lambda s=sess, b=io: s.run_with_iobinding(b))
            timed = common.time_many(calls, warmup=args.warmup, reps=args.reps,
                                     min_time=args.min_time)
            row = {"tokens": t, "torch": timed[0], "ort_dense": timed[1], "ort_contrib": timed[2]}
            for lw, out in outs.items():
                row[f"rel_err_{lw}"] = common.rel_err(out, want)
            rows.append(row)
    machine = common.machine_info(args.threads)
    lines = ["| tokens | torch us | ort dense us | ort contrib us | rel err dense | "
             "rel err contrib |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['torch']['median_us']:.0f} | "
                     f"{r['ort_dense']['median_us']:.0f} | {r['ort_contrib']['median_us']:.0f} "
                     f"| {r['rel_err_dense']:.1e} | {r['rel_err_contrib']:.1e} |")
    payload = {"benchmark": "ops/moe", "machine": machine,
               "config": {"experts": e, "top_k": k, "hidden": h, "inter": i,
                          "tokens": args.tokens, "quick": args.quick},
               "rows": rows, "table": "\n".join(lines)}
    common.write_json(args.out, payload)
    print(f"{common.cpu_line(machine)}\n{e} experts, top-{k}, hidden {h}, inter {i}, fp32\n\n"
          + payload["table"])
    print(f"wrote {args.out}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
