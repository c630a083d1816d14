"""report.json -> moe: a mixture-of-experts engine's experts, top-k and routing balance.

The balance is measured, not assumed: the written engine (its plan on the reference
executor, weights mapped from the file) runs a few windows of the calibration text, and
each `moe` node counts the tokens the router sent to each expert. A router that sends most
tokens to a few experts (a bad checkpoint, or a lowering that broke the router) shows up as
a max/mean load far above 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph
from llm_engine.kernels.ops import OPS

WINDOWS, WINDOW_TOKENS = 2, 128


def moe_layers(graph: Graph) -> list[dict[str, Any]]:
    """What each moe node is: experts, top-k, intermediate size, gate."""
    layers = []
    for node in sorted((n for n in graph.nodes() if n.op == "moe"), key=lambda n: n.order):
        gate_up = graph.node(node.inputs[3]).shape
        layers.append({"node": node.name, "experts": int(gate_up[0]),
                       "top_k": int(graph.node(node.inputs[1]).shape[-1]),
                       "intermediate": int(gate_up[1]) // 2, "gate": node.attrs["act"],
                       "biases": len(node.inputs) > 5})
    return layers


def _counting(counts: torch.Tensor, fn: Callable) -> Callable:
    def observed(x, index, *rest, **attrs):
        counts.add_(torch.bincount(index.flatten(), minlength=counts.numel())[:counts.numel()])
        return fn(x, index, *rest, **attrs)

    return observed


def _route(graph: Graph, weights_file: Path, layers: list[dict[str, Any]],
           samples: list[list[int]]) -> dict[str, torch.Tensor]:
    """Tokens routed to each expert, per moe node, over `samples` (reference executor,
    weights mapped from the written file)."""
    from llm_engine.builder.quant.calibrate import GraphRunner
    from llm_engine.runtime.engine_dir import map_safetensors

    counts = {layer["node"]: torch.zeros(layer["experts"], dtype=torch.long)
              for layer in layers}
    overrides = {name: _counting(c, OPS["moe"].fn) for name, c in counts.items()}
    weights, mapped = map_safetensors(weights_file)
    runner = GraphRunner(graph, weights, overrides)
    for ids in samples:
        runner.logits(ids, last_only=True)
    del runner, weights
    with contextlib.suppress(BufferError):  # a view still alive: the map closes with it
        mapped.close()
    return counts


def moe_report(graph: Graph, weights_file: Path, windows: Callable[[], list[list[int]]],
               ui: Any = None) -> dict[str, Any] | None:
    """None for a dense model; else the layers and, when `windows()` gives calibration
    text (it raises BuildError with the reason otherwise), each layer's share of routed
    tokens per expert."""
    layers = moe_layers(graph)
    if not layers:
        return None
    out: dict[str, Any] = {"layers": layers}
    try:
        samples = windows()
    except BuildError as e:
        out["routing"] = {"measured": False, "reason": str(e)}
        return out
    with ui.stage("moe routing balance") if ui else contextlib.nullcontext():
        counts = _route(graph, weights_file, layers, samples)
    balance = []
    for layer in layers:
        c = counts[layer["node"]].double()
        share = (c / c.sum().clamp_min(1)).tolist()
        layer["routed_share"] = [round(s, 4) for s in share]
        balance.append(float(c.max() / c.mean().clamp_min(1e-9)))
    out["routing"] = {"measured": True, "tokens": sum(len(s) for s in samples),
                      "max_over_mean_load": {"worst_layer": round(max(balance), 3),
                                             "mean": round(sum(balance) / len(balance), 3)}}
    return out
