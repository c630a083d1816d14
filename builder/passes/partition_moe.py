"""Tensor-parallel experts: each expert's intermediate channels split over the ranks.

A `moe` node's experts are MLPs, split as partition_mlp splits a dense MLP: every rank
keeps all experts but only its share of each one's gate and up rows ([E, 2I, H],
interleaved: the rank's channel pairs) and of its down columns ([E, H, I]); the router
runs on every rank (it is small and its choice must agree), each rank's `moe` output is its
partial sum, and an `all_reduce` after it adds them up.

Experts whose weights reach the node through ops (gpt-oss's transposed, interleaved layout)
or with biases (the down bias must be added once, not once per rank) stay replicated.
"""

from __future__ import annotations

from llm_engine.builder.ir import Graph, Node
from llm_engine.builder.passes.partition_slicing import (
    RankPlan,
    Slicer,
    insert_after,
    share,
    split_sizes,
)


def shardable(graph: Graph, node: Node) -> bool:
    return len(node.inputs) == 5 and all(graph.node(i).op == "weight"
                                         for i in node.inputs[3:5])


def shard_moe(graph: Graph, node: Node, tp: int, rank: int, slicer: Slicer,
              plan: RankPlan) -> None:
    inter = graph.node(node.inputs[3]).shape[1] // 2
    local = share(split_sizes(inter, tp), rank)
    plan.mlp_channels.append((local.start, local.stop))
    slicer.take(node.inputs[3], 1, [r for j in local for r in (2 * j, 2 * j + 1)])
    slicer.take(node.inputs[4], 2, list(local))
    insert_after(graph, node, "all_reduce", {})
