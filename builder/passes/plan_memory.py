"""plan_memory: assign activation buffers by liveness so values that never live at the same
time share memory. Sizes are taken at the engine's `max_batch_tokens`.

View ops (reshape, transpose, slice, ...) get no buffer: they extend the life of the tensor
they view. The report gives the peak activation bytes without reuse (every value its own
buffer) and with it.
"""

from __future__ import annotations

from llm_engine.builder.ir import Graph, Node
from llm_engine.builder.passes.report import PassReport
from llm_engine.kernels.dtypes import itemsize
from llm_engine.kernels.ops import VIEW_OPS
from llm_engine.kernels.symbolic import eval_shape


def _bytes(node: Node, env: dict[str, int]) -> int:
    shapes = node.shape if isinstance(node.shape, list) else [node.shape]
    dtypes = node.dtype if isinstance(node.dtype, list) else [node.dtype]
    total = 0
    for shape, dtype in zip(shapes, dtypes):
        n = 1
        for s in eval_shape(shape, env):
            n *= max(s, 1)
        total += n * itemsize(dtype)
    return total


def plan_memory(graph: Graph, options=None) -> tuple[Graph, PassReport]:
    tokens = getattr(options, "max_batch_tokens", None) or 512
    env = {"T": tokens, "N": tokens}
    order = graph.nodes()
    index = {n.name: i for i, n in enumerate(order)}
    base: dict[str, str] = {}  # value -> the buffer-owning value it views
    for n in order:
        if n.op in VIEW_OPS:
            base[n.name] = base.get(n.inputs[0], n.inputs[0])
        else:
            base[n.name] = n.name
    owners = [n for n in order if base[n.name] == n.name and n.op not in ("weight", "input")]
    end = {n.name: index[n.name] for n in owners}
    for n in order:
        for i in n.inputs:
            b = base.get(i, i)
            if b in end:
                end[b] = max(end[b], index[n.name])
    for out in graph.outputs:
        if base.get(out, out) in end:
            end[base.get(out, out)] = len(order)

    sizes = {n.name: _bytes(n, env) for n in owners}
    slots: list[int] = []  # capacity of each buffer
    free_at: list[int] = []  # index after which the slot is free again
    assignment: dict[str, int] = {}
    for n in owners:  # greedy best fit in execution order
        start, need = index[n.name], sizes[n.name]
        candidates = [s for s in range(len(slots)) if free_at[s] < start]
        fitting = [s for s in candidates if slots[s] >= need]
        if fitting:
            slot = min(fitting, key=lambda s: slots[s])
        elif candidates:
            slot = max(candidates, key=lambda s: slots[s])
            slots[slot] = need
        else:
            slot = len(slots)
            slots.append(need)
            free_at.append(-1)
        free_at[slot] = end[n.name]
        assignment[n.name] = slot

    # The true peak: the largest total of values alive at any one step.
    delta = [0] * (len(order) + 2)
    for n, size in sizes.items():
        delta[index[n]] += size
        delta[end[n] + 1] -= size
    peak_live = live = 0
    for d in delta:
        live += d
        peak_live = max(peak_live, live)
    before, after = sum(sizes.values()), sum(slots)
    graph.meta["memory"] = {"max_batch_tokens": tokens, "buffers": slots,
                            "assignment": assignment, "peak_live_bytes": peak_live,
                            "no_reuse_bytes": before, "planned_bytes": after}
    report = PassReport("plan_memory", changed=True, stats={
        "max_batch_tokens": tokens, "values": len(owners), "buffers": len(slots),
        "activation_bytes_no_reuse": before, "activation_bytes_planned": after,
        "peak_live_bytes": peak_live})
    report.notes.append(f"activations at T={tokens}: {before / 2**20:.1f} MiB without reuse, "
                        f"{after / 2**20:.1f} MiB in {len(slots)} shared buffers")
    return graph, report
