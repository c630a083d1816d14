"""`engine inspect ENGINE --onnx`: what the CPU fast path's graph costs per step, in nodes.

onnxruntime runs one kernel per node, so the node count of a decoder layer is the number to
watch (the hand-built peers run about 11 a layer). The exporter names every node after the
plan node it lowers (`<plan node>/<output>`), and a plan node's layer is the decoder layer of
the HF module it came from (`inspect_graph.node_layer`, as in the plan drawing); nodes of no layer are the step's own work (embedding, RoPE
tables, LM head, KV-cache plumbing). The graph onnxruntime actually runs is counted too: it
fuses some nodes when it loads the graph (which depends on the CPU), and keeps most names.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from llm_engine.builder.inspect import InspectError, engine_path, read_json
from llm_engine.builder.inspect_graph import node_layer

# runtime.onnx_backend.ONNX_FILE (importing it pulls in torch; inspect reads files only)
GRAPH_FILE = "model.onnx"


def _plan_layers(plan: dict[str, Any]) -> dict[str, int]:
    """Plan node -> its decoder layer, as the plan drawing counts it (`node_layer`)."""
    return {n["name"]: layer for n in plan["nodes"] if (layer := node_layer(n)) is not None}


def _counts(nodes: Any, layer_of: dict[str, int]) -> dict[str, Any]:
    by_type: Counter[str] = Counter()
    per_layer: Counter[int] = Counter()
    layer_types: Counter[str] = Counter()
    outside = 0
    for node in nodes:
        kind = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        by_type[kind] += 1
        layer = layer_of.get(node.name.split("/", 1)[0]) if "/" in node.name else None
        if layer is None:
            outside += 1
        else:
            per_layer[layer] += 1
            layer_types[kind] += 1
    n_layers = len(per_layer)
    return {
        "nodes": sum(by_type.values()),
        "layers": n_layers,
        "per_layer": [per_layer[i] for i in sorted(per_layer)],
        "mean_per_layer": round(sum(per_layer.values()) / n_layers, 1) if n_layers else None,
        "outside_layers": outside,
        "by_op_type": dict(by_type.most_common()),
        "per_layer_by_op_type": {k: round(v / n_layers, 2) for k, v in
                                 layer_types.most_common()} if n_layers else {},
    }


def _optimized(graph_path: Path) -> Any:
    """The graph onnxruntime runs: loaded with the runtime's optimization level on this CPU
    (its fusions depend on the CPU) and saved back. None without onnxruntime."""
    import tempfile

    import onnx

    try:
        import onnxruntime as ort
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(graph_path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath, load_external_data=False)


def onnx_summary(engine_dir: Path | str, optimized: bool = True) -> dict[str, Any]:
    """Node counts of the engine's ONNX graph as built, and (`optimized`) as onnxruntime runs
    it here: total, by op type, per decoder layer (onnxruntime keeps most nodes' names)."""
    path = engine_path(engine_dir)
    meta = read_json(path / "engine.json", required=True)
    graph_file = (meta.get("cpu_graph") or {}).get("file")
    if not graph_file or not (path / GRAPH_FILE).is_file():
        raise InspectError(f"{path} has no CPU fast-path graph (engine.json cpu_graph); "
                           "build it for the CPU with onnx installed")
    if graph_file != GRAPH_FILE or (path / GRAPH_FILE).is_symlink():
        # engine.json is untrusted: it names no other file, as the runtime requires too
        raise InspectError(f"engine.json cpu_graph names {str(graph_file)[:80]!r}; the builder "
                           f"writes {GRAPH_FILE} only, refusing to read another file")
    try:
        import onnx
    except ImportError:
        raise InspectError("reading the ONNX graph needs onnx: pip install onnx") from None
    model = onnx.load(path / graph_file, load_external_data=False)
    layer_of = _plan_layers(read_json(path / "plan.rank0.json", required=True))
    summary = {"file": graph_file, **_counts(model.graph.node, layer_of)}
    ran = _optimized(path / graph_file) if optimized else None
    summary["onnxruntime"] = None if ran is None else _counts(ran.graph.node, layer_of)
    return summary


def print_onnx(summary: dict[str, Any], as_json: bool = False) -> None:
    if as_json:
        import json

        print(json.dumps(summary, indent=1))
        return
    per = summary["per_layer"]
    print(f"ONNX graph {summary['file']}: {summary['nodes']} nodes as built "
          "(onnxruntime may fuse some when it loads the graph)")
    if per:
        spread = f"{min(per)}" if min(per) == max(per) else f"{min(per)}-{max(per)}"
        print(f"  per decoder layer: {spread} ({summary['layers']} layers); outside the "
              f"layers: {summary['outside_layers']}")
        print("  a layer's nodes by op type: " + ", ".join(
            f"{k} {v:g}" for k, v in summary["per_layer_by_op_type"].items()))
    print("  all nodes by op type: " + ", ".join(
        f"{k} {v}" for k, v in summary["by_op_type"].items()))
    ran = summary.get("onnxruntime")
    if ran:
        per = ran["per_layer"]
        spread = "" if not per else f"; per decoder layer: {min(per)}" if min(per) == max(per) \
            else f"; per decoder layer: {min(per)}-{max(per)}"
        print(f"after onnxruntime's graph optimizations on this CPU: {ran['nodes']} nodes"
              f"{spread}, outside the layers: {ran['outside_layers']}")
        print("  a layer's nodes by op type: " + ", ".join(
            f"{k} {v:g}" for k, v in ran["per_layer_by_op_type"].items()))
