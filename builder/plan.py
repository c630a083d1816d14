"""Graph -> plan: the ordered op list the runtime executes (plan.rank<N>.json)."""

from __future__ import annotations

from typing import Any

from llm_engine.builder.ir import Graph

PLAN_FORMAT = 1


def last_uses(order: list[str], graph: Graph) -> dict[str, list[str]]:
    """For each node, the values whose last reader it is (the runtime drops them after)."""
    last: dict[str, str] = {}
    for name in order:
        for i in graph.node(name).inputs:
            last[i] = name
    keep = set(graph.outputs)
    frees: dict[str, list[str]] = {}
    for value, reader in last.items():
        if value not in keep and graph.node(value).op not in ("weight", "input"):
            frees.setdefault(reader, []).append(value)
    return frees


def to_plan(graph: Graph) -> dict[str, Any]:
    order = [n.name for n in graph.nodes()]
    frees = last_uses(order, graph)
    buffers = graph.meta.get("memory", {}).get("assignment", {})
    codegen = graph.meta.get("codegen", {})
    node_kernels = codegen.get("node_kernels", {})
    nodes = []
    for name in order:
        n = graph.node(name)
        entry: dict[str, Any] = {"name": n.name, "op": n.op, "inputs": n.inputs,
                                 "attrs": n.attrs, "shape": n.shape, "dtype": n.dtype}
        if name in buffers:
            entry["buffer"] = buffers[name]
        if name in frees:
            entry["free"] = sorted(frees[name])
        if name in node_kernels:  # kept apart from attrs: attrs are the op's arguments
            entry["kernel"] = node_kernels[name]
        entry["origin"] = n.origin
        nodes.append(entry)
    return {
        "format": PLAN_FORMAT,
        "inputs": [{"name": graph.node(i).attrs["name"], "node": i, "shape": graph.node(i).shape,
                    "dtype": graph.node(i).dtype} for i in graph.inputs],
        "outputs": list(graph.outputs),
        "weights": {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in
                    sorted(graph.weights.items())},
        "kv_cache": graph.meta.get("kv_cache"),
        "memory": {k: v for k, v in graph.meta.get("memory", {}).items() if k != "assignment"},
        "kernels": codegen.get("kernels", {}),
        "nodes": nodes,
    }
