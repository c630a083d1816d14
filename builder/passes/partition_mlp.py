"""Tensor-parallel MLP: the channels between the up and down projections are split.

The region is found from the graph: the elementwise nodes (and reshapes that keep the last
dimension) feeding a linear's input, and the linears feeding them. That covers gate/up
(fused or not) with a gated activation, and GPT-2's c_fc -> gelu -> c_proj, without naming
modules. The column projections are split by output channels, the down projection by input
channels, then `all_reduce`.
"""

from __future__ import annotations

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph, Node
from llm_engine.builder.passes.partition_slicing import (
    RankPlan,
    Slicer,
    insert_after,
    set_width,
    share,
    split_sizes,
    take_in_cols,
    take_out_rows,
)
from llm_engine.kernels import formats
from llm_engine.kernels.ops import OPS


def _elementwise(node: Node) -> bool:
    return node.op in ("gated_act", "pointwise", "to_dtype") or \
        OPS[node.op].kind == "elementwise"


def _keeps_last_dim(graph: Graph, node: Node) -> bool:
    return node.op == "reshape" and graph.node(node.inputs[0]).shape[-1] == node.shape[-1]


def mlp_region(graph: Graph, down: Node) -> tuple[list[Node], list[Node]] | None:
    """(column projections, elementwise nodes and last-dim-keeping reshapes) feeding
    `down`'s input, or None."""
    first = graph.node(down.inputs[0])
    if not (_elementwise(first) or _keeps_last_dim(graph, first)):
        return None
    region: dict[str, Node] = {}
    columns: dict[str, Node] = {}
    stack = [first]
    while stack:
        node = stack.pop()
        if node.name in region:
            continue
        region[node.name] = node
        for i in node.inputs:
            producer = graph.node(i)
            if producer.op == "linear":
                columns[producer.name] = producer
            elif producer.op == "weight":
                continue
            elif _elementwise(producer) or _keeps_last_dim(graph, producer):
                stack.append(producer)
            else:
                return None
    inside = set(region) | {down.name}
    for node in [*region.values(), *columns.values()]:
        if any(u.name not in inside for u in graph.users(node.name)) and node is not first:
            return None
    if any(u.name != down.name for u in graph.users(first.name)) or not columns or \
            not any(_elementwise(n) for n in region.values()):
        return None
    return list(columns.values()), list(region.values())


def _feeds_gated(graph: Graph, node: Node) -> bool:
    """Whether `node` reaches a gated_act through last-dim-keeping reshapes."""
    for user in graph.users(node.name):
        if user.op == "gated_act" or (_keeps_last_dim(graph, user) and _feeds_gated(graph, user)):
            return True
    return False


def shard_mlp(graph: Graph, down: Node, columns: list[Node], region: list[Node], tp: int,
              rank: int, slicer: Slicer, claimed: set[str], plan: RankPlan) -> None:
    width = graph.node(down.inputs[0]).shape[-1]
    unit = (down.attrs.get("group_size") or 1) if formats.of(down.attrs).grouped else 1
    local = share(split_sizes(width, tp, unit), rank)
    plan.mlp_channels.append((local.start, local.stop))
    for node in region:
        if node.op == "reshape":
            old = node.shape[-1]
            set_width([node], old, len(local) * old // width)
    for col in columns:
        gated = _feeds_gated(graph, col)
        if gated:
            index = [*local, *(width + i for i in local)]
        else:
            index = list(local)
        if col.shape[-1] != (2 * width if gated else width):
            raise BuildError(f"tensor parallelism: MLP projection {col.name} has "
                             f"{col.shape[-1]} channels, expected {width}")
        take_out_rows(slicer, col, index)
        claimed.add(col.name)
    for node in region:  # per-channel constants of the elementwise region (e.g. a bias)
        for i in node.inputs:
            producer = graph.node(i)
            if producer.op == "weight" and producer.shape and producer.shape[-1] == width:
                slicer.take(i, len(producer.shape) - 1, list(local))
    take_in_cols(slicer, down, local, keep_bias=rank == 0)
    claimed.add(down.name)
    insert_after(graph, down, "all_reduce", {})
