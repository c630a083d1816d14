"""Pipeline-parallel partitioning: consecutive layers per stage, one graph per stage.

Every node gets a stage: attention nodes from their layer index, other nodes from the layer
they are found in by the graph's structure (`layer_of`: a layer starts at the norm of the
residual stream that feeds its attention), never earlier than their inputs' stages. Nodes computed from the step's inputs and weights alone (the embedding,
RoPE tables) are copied into every stage that reads them, so stages exchange only the
residual stream: the values made at or before a boundary and read after it. Those become
outputs of the stage before and inputs (`pp.<name>`) of the stage after; a value that skips
a stage is passed through it. The last stage computes the logits. Each stage's attention
layers are renumbered from 0, and its KV cache holds only its layers.
"""

from __future__ import annotations

import copy
import re
from collections import deque
from typing import Any

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph, Node
from llm_engine.builder.passes.partition import partition_tp
from llm_engine.builder.passes.partition_slicing import split_sizes, weight_bytes
from llm_engine.builder.passes.report import PassReport
from llm_engine.kernels.dtypes import to_torch_dtype
from llm_engine.kernels.ops import VIEW_OPS
from llm_engine.runtime.pipeline import (
    RECV_PREFIX,  # the plan input names the runtime's stages feed
)

_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")
_NORMS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")


def _origin_layers(node: Node) -> list[int]:
    found = []
    for entry in node.origin:
        m = _LAYER.search(entry.split("@", 1)[-1])
        if m:
            found.append(int(m.group(1)))
    return found


def _on_projection(graph: Graph, norm: Node) -> bool:
    """A plain norm of a projection's output (the per-head q/k norms of Qwen3, OLMo 2), not of
    the residual stream: a layer does not start there."""
    if norm.op.startswith("add_"):
        return False
    node = graph.node(norm.inputs[0])
    while (node.op in VIEW_OPS or node.op == "to_dtype") and node.inputs:
        node = graph.node(node.inputs[0])
    return node.op in ("linear", "matmul")


def _entry(graph: Graph, attn: Node) -> str | None:
    """The norm that starts `attn`'s layer: the nearest residual-stream norm behind its query
    input (breadth first, so the layer's own input norm is found before any earlier one)."""
    queue, seen = deque([attn.inputs[0]]), set()
    while queue:
        node = graph.node(queue.popleft())
        if node.name in seen or node.op in ("input", "weight"):
            continue
        seen.add(node.name)
        base = graph.node(node.inputs[0]) if node.op == "getitem" else node
        if base.op in _NORMS and not _on_projection(graph, base):
            return base.name
        queue.extend(node.inputs)
    return None


def layer_of(graph: Graph, attn: list[Node]) -> dict[str, int] | None:
    """Each node's layer from the graph's structure: the number of layer-starting norms at or
    before it on its inputs' paths, less one (-1: before the first layer, the embedding). None
    when the structure is not a chain of such norms, one per attention layer, each after the
    last; the HF module paths in the nodes' origins are used then."""
    entries = [_entry(graph, a) for a in attn]
    if None in entries or len(set(entries)) != len(entries):
        return None
    starts = set(entries)
    count: dict[str, int] = {}
    for node in graph.nodes():
        count[node.name] = max((count[i] for i in node.inputs), default=0) + \
            (node.name in starts)
    if [count[e] for e in entries] != list(range(1, len(entries) + 1)):
        return None  # an entry not after the previous one: not a chain of layers
    return {name: c - 1 for name, c in count.items()}


def assign_stages(graph: Graph, pp: int) -> tuple[dict[str, int | None], list[int]]:
    """Stage of every node (None: computed from inputs and weights alone, copied where
    needed) and the number of layers per stage."""
    attn = [n for n in graph.nodes() if n.op == "paged_attention"]
    n_layers = len(attn)
    if n_layers < pp:
        raise BuildError(f"--pp {pp} exceeds the model's {n_layers} layers")
    sizes = split_sizes(n_layers, pp)
    stage_of_layer = [s for s, n in enumerate(sizes) for _ in range(n)]
    layers = layer_of(graph, attn)
    stages: dict[str, int | None] = {}
    for node in graph.nodes():
        if node.op in ("input", "weight"):
            stages[node.name] = None
            continue
        deps = [stages[i] for i in node.inputs if stages[i] is not None]
        if node.op == "paged_attention":
            own = [stage_of_layer[node.attrs["layer"]]]
        elif node.op == "getitem":  # stays with the multi-output op it unpacks
            own = []
        else:
            found = _origin_layers(node) if layers is None else \
                [layers[node.name]] if layers[node.name] >= 0 else []
            own = [stage_of_layer[min(layer, n_layers - 1)] for layer in found]
        if not deps and not own and node.op not in ("all_reduce", "all_gather"):
            stages[node.name] = None  # embedding, RoPE tables: free to copy
        elif not deps and not own:  # a collective runs once, on the first stage
            stages[node.name] = 0
        else:
            stages[node.name] = max(deps + own)
    return stages, sizes


def _needed(graph: Graph, stages: dict[str, int | None], roots: set[str]) -> set[str]:
    """Free nodes (and their free ancestors) that `roots` read."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        for i in graph.node(name).inputs:
            if stages[i] is None and i not in seen and graph.node(i).op not in ("input",
                                                                                  "weight"):
                seen.add(i)
                stack.append(i)
    return seen


def stage_graph(graph: Graph, stages: dict[str, int | None], stage: int, pp: int,
                crossing: list[list[str]], first_layer: int) -> Graph:
    """The graph of one stage: its nodes, the free nodes they read, inputs for the values
    crossing into it and outputs for the values crossing out of it."""
    g = copy.deepcopy(graph)
    mine = {n for n, s in stages.items() if s == stage}
    keep = mine | _needed(g, stages, mine)
    incoming = crossing[stage - 1] if stage > 0 else []
    outgoing = crossing[stage] if stage < pp - 1 else list(graph.outputs)
    recv: dict[str, str] = {}
    for name in incoming:
        node = g.node(name)
        new = g.add("input", [], node.shape, node.dtype, attrs={"name": RECV_PREFIX + name},
                    name=RECV_PREFIX.replace(".", "_") + name, order=-2.0)
        recv[name] = new.name
        g.inputs.append(new.name)
    for name in list(mine | keep):
        node = g.node(name)
        if any(i in recv for i in node.inputs):
            g.set_inputs(node, [recv.get(i, i) for i in node.inputs])
    g.outputs = [recv.get(o, o) for o in outgoing]
    drop = [n for n in g.g if n not in keep and n not in recv.values()
            and g.node(n).op not in ("input", "weight")]
    g.g.remove_nodes_from(drop)
    g.dce()
    # This stage's attention layers, renumbered from 0; its KV cache holds only them.
    layers = (g.meta.get("kv_cache") or {}).get("layers")
    attn = sorted((n for n in g.nodes() if n.op == "paged_attention"),
                  key=lambda n: n.attrs["layer"])
    if layers is not None:
        g.meta["kv_cache"] = {**g.meta["kv_cache"],
                              "layers": [layers[n.attrs["layer"]] for n in attn]}
    for local, node in enumerate(attn):
        node.attrs["layer"] = local
    g.meta["pipeline"] = {"pp": pp, "stage": stage, "first_layer": first_layer}
    return g


def partition_pp(graph: Graph, pp: int) -> tuple[list[Graph], PassReport]:
    report = PassReport("partition_pp")
    stages, sizes = assign_stages(graph, pp)
    users: dict[str, list[int]] = {}
    for node in graph.nodes():
        s = stages[node.name]
        if s is None:
            continue
        for i in node.inputs:
            if stages[i] is not None:
                users.setdefault(i, []).append(s)
    for out in graph.outputs:  # the logits come out of the last stage
        users.setdefault(out, []).append(pp)
    crossing = []
    for b in range(pp - 1):
        live = sorted(v for v, readers in users.items()
                      if stages[v] is not None and stages[v] <= b and max(readers) > b)
        for v in live:
            if isinstance(graph.node(v).shape, list):
                raise BuildError(f"pipeline parallelism: stage boundary {b} cuts through the "
                                 f"multi-output op {v}; try another --pp")
        crossing.append(live)
    graphs = [stage_graph(graph, stages, s, pp, crossing, sum(sizes[:s])) for s in range(pp)]
    sent = []
    for b, live in enumerate(crossing):
        per_token = 0
        for v in live:
            node = graph.node(v)
            width = 1
            for d in node.shape[1:] if isinstance(node.shape, tuple | list) else ():
                width *= d if isinstance(d, int) and d > 0 else 1
            per_token += width * to_torch_dtype(node.dtype).itemsize
        sent.append({"after_stage": b, "values": live, "bytes_per_token": per_token})
    report.changed = True
    report.stats = {"pp": pp, "layers_per_stage": sizes,
                    "bytes_per_token_between_stages": [x["bytes_per_token"] for x in sent]}
    details: dict[str, Any] = {
        **report.stats, "boundaries": sent,
        "ranks": [{"rank": s, "stage": s, "weight_bytes": weight_bytes(g),
                   "layers": [g.meta["pipeline"]["first_layer"],
                              g.meta["pipeline"]["first_layer"] + sizes[s]]}
                  for s, g in enumerate(graphs)]}
    for g in graphs:
        g.meta["partition"] = {"pp": pp, "report": details}
    report.notes.append(f"pp={pp}: layers per stage {sizes}; "
                        + ", ".join(f"{x['bytes_per_token']} B/token after stage "
                                    f"{x['after_stage']}" for x in sent))
    return graphs, report


def partition_tp_pp(graph: Graph, tp: int, pp: int) -> tuple[list[Graph], PassReport]:
    """Tensor parallelism within each pipeline stage: the tp rank graphs, each cut into pp
    stages. Rank s * tp + t is stage s of tensor-parallel shard t; its collectives run among
    the ranks of stage s, and it passes the (replicated) residual stream to rank
    (s + 1) * tp + t."""
    shards, tp_report = partition_tp(graph, tp)
    staged = [partition_pp(g, pp) for g in shards]
    ranks: list[Graph] = []
    for s in range(pp):
        for t in range(tp):
            ranks.append(staged[t][0][s])
    pp_report = staged[0][1]
    report = PassReport("partition_tp_pp", changed=True,
                        stats={**tp_report.stats, **pp_report.stats},
                        notes=tp_report.notes + pp_report.notes)
    details = {**report.stats, "ranks": [
        {"rank": r, "stage": r // tp, "tp_rank": r % tp, "weight_bytes": weight_bytes(g)}
        for r, g in enumerate(ranks)]}
    for g in ranks:
        g.meta["partition"] = {"tp": tp, "pp": pp, "report": details}
    return ranks, report
