"""Quantize GEMM weights (`engine build --quant MODE`).

`int8-wo`: every `linear` whose weight is a weight tensor gets an int8 weight with one fp32
scale per output channel (symmetric, scale = max|row| / 127) and computes with it directly:
the node's `b_format` becomes `int8_channel` and its inputs `x, q, scale[, bias]`. Weights
named by `--quant-exclude` patterns (fnmatch on the weight name or the HF module path) keep
full precision. The values are made when the weights are written (`builder.weights`), so the
pass itself only rewrites the graph; the writer records each tensor's quantization error.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from builder.errors import BuildError
from builder.ir import Graph, WeightSpec
from builder.passes.report import PassReport

MODES = ("int8-wo",)


def _excluded(name: str, origin: list[str], patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) or any(fnmatch.fnmatch(o, p) for o in origin)
               for p in patterns)


def quantize(graph: Graph, options: Any) -> tuple[Graph, PassReport]:
    report = PassReport("quantize")
    mode = getattr(options, "quant", None)
    if mode is None:
        report.notes.append("no --quant: weights keep the build dtype")
        return graph, report
    if mode not in MODES:
        raise BuildError(f"--quant {mode!r} is not one of {', '.join(MODES)}")
    patterns = tuple(getattr(options, "quant_exclude", ()) or ())
    quantized, kept = 0, 0
    for node in graph.nodes():
        if node.op != "linear" or node.attrs.get("b_format", "dense") != "dense":
            continue
        weight = graph.producer(node, 1)
        if weight.op != "weight":
            continue
        spec = graph.weights[weight.attrs["name"]]
        if _excluded(spec.name, weight.origin + node.origin, patterns):
            kept += 1
            continue
        n, k = spec.shape
        of = {"quant": "int8_channel", "of": spec.recipe}
        q = graph.add_weight(WeightSpec(f"{spec.name}.int8", (n, k), "int8",
                                        {**of, "part": "q"}), origin=weight.origin)
        scale = graph.add_weight(WeightSpec(f"{spec.name}.scale", (n,), "float32",
                                            {**of, "part": "scale"}), origin=weight.origin)
        graph.set_inputs(node, [node.inputs[0], q.name, scale.name, *node.inputs[2:]])
        node.attrs["b_format"] = "int8_channel"
        quantized += 1
    graph.dce()
    report.changed = quantized > 0
    report.stats.update({"mode": mode, "quantized_linears": quantized, "excluded": kept})
    return graph, report
