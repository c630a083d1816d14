"""Tensor-parallel vocabulary: the embedding table and the LM head split by vocabulary rows.

A vocabulary size need not divide by the rank count, so shards are padded to equal size: the
lookup masks ids outside its shard and all-reduces, and the LM head's logits are
all-gathered and the padding cut. A tied table is sliced once and serves both.
"""

from __future__ import annotations

from llm_engine.builder.ir import Graph
from llm_engine.builder.passes.partition_slicing import (
    PASS_THROUGH,
    RankPlan,
    Slicer,
    insert_after,
    take_out_rows,
)


def shard_vocab(graph: Graph, tp: int, rank: int, slicer: Slicer, claimed: set[str],
                plan: RankPlan) -> None:
    vocab = None
    for emb in [n for n in graph.nodes() if n.op == "embedding"]:
        vocab = graph.node(emb.inputs[0]).shape[0]
        shard = -(-vocab // tp)
        lo, hi = min(rank * shard, vocab), min((rank + 1) * shard, vocab)
        rows = list(range(lo, hi))
        for operand in [emb.inputs[0], *emb.inputs[2:]]:  # the table and its row scales
            slicer.take(operand, 0, rows, pad_to=shard)
        emb.attrs["vocab_start"], emb.attrs["vocab_end"] = lo, hi
        plan.vocab = (lo, hi)
        insert_after(graph, emb, "all_reduce", {})
    if len(graph.outputs) != 1:
        return
    head = graph.node(graph.outputs[0])
    while head.op in PASS_THROUGH and head.op != "linear":
        head = graph.node(head.inputs[0])
    if head.op != "linear" or head.name in claimed:
        return
    vocab = head.shape[-1]
    shard = -(-vocab // tp)
    lo, hi = min(rank * shard, vocab), min((rank + 1) * shard, vocab)
    take_out_rows(slicer, head, list(range(lo, hi)), pad_to=shard)
    claimed.add(head.name)
    plan.vocab = (lo, hi)
    insert_after(graph, head, "all_gather", {"dim": len(head.shape) - 1, "size": vocab,
                                              "ranks": tp})
