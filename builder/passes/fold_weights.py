"""fold_weights: ops on weights alone are done once, at build time, into new weights.

Some models rearrange their weights in forward: gpt-oss's experts are stored transposed,
the `moe` op takes gate and up rows interleaved, and a traced `.t()` or slice of a
parameter is an op like any other. Left in the plan, each runs on every step (the
reference executor copies the tensor each time, and onnxruntime does not fold large
initializers either). This pass evaluates every node whose inputs are all weights (shape
and copy ops only) into a weight whose recipe is that op over its inputs' recipes: the
writer materializes it tensor by tensor, and the engine stores the result.
"""

from __future__ import annotations

from llm_engine.builder.ir import Graph, WeightSpec
from llm_engine.builder.passes.report import PassReport

FOLDABLE = frozenset({"transpose", "permute", "reshape", "slice", "select", "cat", "unsqueeze",
                      "squeeze", "to_dtype"})


def _symbolic(value) -> bool:
    if isinstance(value, dict):
        return "sym" in value or any(_symbolic(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_symbolic(v) for v in value)
    return False


def fold_weights(graph: Graph, options=None) -> tuple[Graph, PassReport]:
    report = PassReport("fold_weights")
    folded = 0
    for node in sorted(graph.nodes(), key=lambda n: n.order):
        if node.op not in FOLDABLE or not node.inputs or _symbolic(node.attrs):
            continue
        producers = [graph.node(i) for i in node.inputs]
        if any(p.op != "weight" for p in producers):
            continue
        specs = [graph.weights[p.attrs["name"]] for p in producers]
        name = f"fold.{node.name}"
        spec = WeightSpec(name, tuple(int(s) for s in node.shape), node.dtype,
                          {"fold": node.op, "attrs": dict(node.attrs),
                           "of": [s.recipe for s in specs]})
        new = graph.add_weight(spec, origin=node.origin)
        graph.replace_uses(node.name, new.name)
        graph.remove(node.name)
        folded += 1
    if folded:
        graph.dce()
        report.changed = True
    report.stats = {"folded": folded}
    return graph, report
