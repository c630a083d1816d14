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


def export_moe(lowering: str, k: int, hidden: int, folder: Path, weights: dict,
               attrs: dict | None = None) -> Path:
    """The exporter's `moe` lowering of a one-node plan: `lowering` is `auto` (the contrib
    op, MoE or QMoE, that a build picks), `dense` or `gather`; `weights` the node's weight
    operands in order (gate_up's parts, down's parts, biases), `attrs` its attrs."""
    from onnx import TensorProto, helper
    from safetensors.torch import save_file

    from llm_engine.builder.onnx_export import OPSET, _Emitter, _live
    from llm_engine.kernels.dtypes import dtype_name

    folder = folder / f"{lowering}-{len(list(folder.iterdir()))}"  # one weights file each
    folder.mkdir()
    save_file(weights, str(folder / "weights.safetensors"))
    h = hidden

    def node(name, op, inputs, shape, dtype="float32", attrs=None):
        return {"name": name, "op": op, "inputs": inputs, "attrs": attrs or {}, "shape": shape,
                "dtype": dtype}

    nodes = [node("x", "input", [], ["T", h], attrs={"name": "x"}),
             node("index", "input", [], ["T", k], "int64", {"name": "index"}),
             node("w", "input", [], ["T", k], attrs={"name": "w"})]
    nodes += [node(name, "weight", [], list(t.shape), dtype_name(t.dtype), {"name": name})
              for name, t in weights.items()]
    nodes.append(node("y", "moe", ["x", "index", "w", *weights], ["T", h],
                      attrs=attrs or {"act": "silu"}))
    plan = {"inputs": [{"name": n["name"], "node": n["name"], "shape": n["shape"],
                        "dtype": n["dtype"]} for n in nodes[:3]],
            "outputs": ["y"], "kv_cache": {"layers": []}, "nodes": nodes}
    em = _Emitter(plan, folder / "weights.safetensors")
    em.MOE_LOWERING = lowering
    for n in nodes:
        em.emit(n)
    em.onnx_nodes.append(helper.make_node("Identity", [em.values["y"]], ["y"]))
    graph = helper.make_graph(_live(em.onnx_nodes, ["y"]), f"moe_{lowering}", em.graph_inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              em.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    path = folder / "moe.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def quantized(dense: dict, fmt: str, group: int) -> tuple[dict, dict]:
    """The experts in a quantized format as the quantize pass stores them (round to
    nearest; int4 with integer zero points), and the node's attrs."""
    import torch

    from llm_engine.kernels import formats
    from llm_engine.kernels import quant as Q

    parts = {}
    for name, w in dense.items():
        per_expert = [Q.quantize_int8_channel(we) if fmt == "int8_channel" else
                      Q.quantize_int4_group(we, group, integer_zeros=True) for we in w]
        for j, part in enumerate(formats.get(fmt).parts):
            parts[f"{name}.{part.suffix}"] = torch.stack([p[j] for p in per_expert])
    attrs = {"act": "silu", "w_format": fmt, **({"group_size": group} if "int4" in fmt else {})}
    return parts, attrs


def main(argv=None) -> dict[str, Any]:
    import torch

    from llm_engine.kernels.ops import OPS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--group", type=int, default=128, help="int4 group size")
    common.add_timing_args(p, warmup=3, reps=10, min_time=0.3, out=DEFAULT_OUT,
                           quick="smoke test: tiny shapes, a few calls")
    args = p.parse_args(argv)
    if args.quick:
        args.experts, args.top_k, args.hidden, args.inter, args.group = 4, 2, 32, 48, 16
        args.tokens, args.warmup, args.reps, args.min_time = [1, 5], 1, 3, 0.0
    torch.set_num_threads(args.threads)
    e, k, h, i = args.experts, args.top_k, args.hidden, args.inter
    g = torch.Generator().manual_seed(args.seed)
    dense = {"gate_up": torch.randn(e, 2 * i, h, generator=g) * h ** -0.5,
             "down": torch.randn(e, h, i, generator=g) * i ** -0.5}
    variants = {  # name: (lowering, weight operands, attrs)
        "ort_dense": ("dense", dense, None),
        "ort_gather": ("gather", dense, None),
        "ort_contrib": ("auto", dense, None),
        "ort_qmoe_int8": ("auto", *quantized(dense, "int8_channel", args.group)),
        "ort_qmoe_int4": ("auto", *quantized(dense, "int4_group", args.group)),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="ops_moe_") as tmp:
        sessions = {name: common.ort_session(export_moe(lw, k, h, Path(tmp), ws, attrs),
                                             args.threads)
                    for name, (lw, ws, attrs) in variants.items()}
        for t in args.tokens:
            x = torch.randn(t, h, generator=g)
            probs = torch.randn(t, e, generator=g).softmax(-1)
            index = probs.topk(k).indices
            w = probs.gather(-1, index)
            calls = [lambda x=x, index=index, w=w: OPS["moe"].fn(
                x, index, w, dense["gate_up"], dense["down"], act="silu")]
            outs: dict[str, Any] = {}
            for name, sess in sessions.items():
                out = torch.empty(t, h)
                io = sess.io_binding()
                for arg, val in (("x", x), ("index", index), ("w", w)):
                    common.bind(io, arg, val.contiguous())
                common.bind(io, "y", out, output=True)
                outs[name] = out
                calls.append(lambda s=sess, b=io: s.run_with_iobinding(b))
            timed = common.time_many(calls, warmup=args.warmup, reps=args.reps,
                                     min_time=args.min_time)
            row = {"tokens": t, "torch": timed[0]}
            for (name, out), tm in zip(outs.items(), timed[1:], strict=True):
                _, ws, attrs = variants[name]
                # each against the reference on the same stored weights (quantized or not)
                want = OPS["moe"].fn(x, index, w, *ws.values(), **(attrs or {"act": "silu"}))
                row[name] = tm
                row[f"rel_err_{name[4:]}"] = common.rel_err(out, want)
            rows.append(row)
    machine = common.machine_info(args.threads)
    names = list(variants)
    lines = ["| tokens | torch us | " + " | ".join(f"{n[4:]} us" for n in names) + " | "
             + " | ".join(f"rel err {n[4:]}" for n in names) + " |",
             "|---" * (2 + 2 * len(names)) + "|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['torch']['median_us']:.0f} | "
                     + " | ".join(f"{r[n]['median_us']:.0f}" for n in names) + " | "
                     + " | ".join(f"{r['rel_err_' + n[4:]]:.1e}" for n in names) + " |")
    payload = {"benchmark": "ops/moe", "machine": machine,
               "config": {"experts": e, "top_k": k, "hidden": h, "inter": i,
                          "group_size": args.group, "tokens": args.tokens,
                          "quick": args.quick},
               "rows": rows, "table": "\n".join(lines)}
    common.write_json(args.out, payload)
    print(f"{common.cpu_line(machine)}\n{e} experts, top-{k}, hidden {h}, inter {i}, fp32\n\n"
          + payload["table"])
    print(f"wrote {args.out}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
