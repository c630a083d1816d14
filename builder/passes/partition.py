"""Tensor-parallel partitioning (Megatron-style): one graph per rank.

The pass finds the model's parallel regions from the graph's structure, not from module
names, so every architecture the frontend traces partitions the same way:

- attention: the projection(s) feeding each `paged_attention` node are split by output
  channels into whole heads; the projection its output feeds (o_proj) is split by input
  channels and followed by an `all_reduce`. Query heads are dealt out as evenly as possible;
  each rank keeps the KV heads its query heads read, so a KV head is replicated on every rank
  whose query heads straddle it (9 query heads over 3 KV heads at tp=2: 5+4 query heads,
  KV heads {0,1} and {1,2}). Where that grouping is not uniform the attention op gets an
  explicit `kv_head_map`.
- MLP: the projections feeding the elementwise region before a down projection (gate/up,
  fused or not, or GPT-2's c_fc) are split by output channels, the down projection by input
  channels, then `all_reduce`.
- embedding and LM head: split by vocabulary rows, padded to equal shards; the lookup masks
  ids outside the shard and all-reduces, the LM head's logits are all-gathered and the
  padding cut. A tied table is one shard serving both.
- everything else (norms, residual adds, RoPE tables) is replicated.

Quantized weights split with their scales: output-channel splits take rows of every operand;
input-channel splits take columns of the codes and whole groups of int4 scales and zeros
(the split points are aligned to the group size, or the build is refused). Biases of
row-parallel projections stay on rank 0 only, so the all-reduce adds them once.

The attention, MLP and vocabulary sharding are in partition_attention.py, partition_mlp.py
and partition_vocab.py, the weight slicing they share in partition_slicing.py; this file
runs them once per rank and reports what each rank holds.
"""

from __future__ import annotations

import copy
from typing import Any

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph
from llm_engine.builder.passes.partition_attention import shard_attention
from llm_engine.builder.passes.partition_mlp import mlp_region, shard_mlp
from llm_engine.builder.passes.partition_moe import shard_moe, shardable
from llm_engine.builder.passes.partition_slicing import RankPlan, Slicer, weight_bytes
from llm_engine.builder.passes.partition_vocab import shard_vocab
from llm_engine.builder.passes.report import PassReport
from llm_engine.kernels.dtypes import to_torch_dtype


# ---- shapes --------------------------------------------------------------------------------
def _reshape_nodes(graph: Graph) -> None:
    """Recompute recorded shapes after the split: run the reference ops on meta tensors at
    two token counts; symbolic entries keep their expressions."""
    from llm_engine.builder.verify import PROBES, _expected

    probes: list[dict[str, Any]] = [{} for _ in PROBES]
    order = graph.nodes()
    for node in order:
        results = []
        for env, values in zip(PROBES, probes):
            if node.op == "weight":
                spec = graph.weights[node.attrs["name"]]
                node.shape = tuple(spec.shape)
            values[node.name] = _expected(node, values, env)
            v = values[node.name]
            results.append([tuple(t.shape) for t in (v if isinstance(v, tuple) else (v,))])
        if node.op in ("input", "weight"):
            continue
        recorded = node.shape if isinstance(node.shape, list) else [node.shape]
        new = []
        for k, shape in enumerate(recorded):
            dims = []
            for i, s in enumerate(shape):
                a, b = results[0][k][i], results[1][k][i]
                dims.append(s if isinstance(s, str) or (s == -1) else a)
                if not isinstance(s, str) and s != -1 and a != b:
                    raise BuildError(f"tensor parallelism: {node.name}'s dimension {i} "
                                     "became token-dependent")
            new.append(tuple(dims) if isinstance(shape, tuple) else dims)
        node.shape = new if isinstance(node.shape, list) else new[0]


# ---- the pass ------------------------------------------------------------------------------
def partition_rank(graph: Graph, tp: int, rank: int) -> tuple[Graph, RankPlan]:
    """Rank `rank`'s graph out of `tp` (the input graph is not modified)."""
    g = copy.deepcopy(graph)
    slicer = Slicer(g)
    claimed: set[str] = set()
    plan = RankPlan(rank)
    for attn in [n for n in g.nodes() if n.op == "paged_attention"]:
        shard_attention(g, attn, tp, rank, slicer, claimed, plan)
    for node in g.nodes():
        if node.op != "linear" or node.name in claimed:
            continue
        found = mlp_region(g, node)
        if found is not None and not any(c.name in claimed for c in found[0]):
            shard_mlp(g, node, *found, tp, rank, slicer, claimed, plan)
    for node in [n for n in g.nodes() if n.op == "moe"]:
        if shardable(g, node):
            shard_moe(g, node, tp, rank, slicer, plan)
    shard_vocab(g, tp, rank, slicer, claimed, plan)
    g.dce()
    _reshape_nodes(g)
    g.meta["partition"] = {"tp": tp, "rank": rank}
    return g, plan


def partition_tp(graph: Graph, tp: int) -> tuple[list[Graph], PassReport]:
    report = PassReport("partition_tp")
    graphs, plans = [], []
    for rank in range(tp):
        g, plan = partition_rank(graph, tp, rank)
        graphs.append(g)
        plans.append(plan)
    replicated = [n.name for n in graph.nodes() if n.op == "linear"
                  and all(n.name in g and g.node(n.name).inputs == n.inputs
                          and all(g.node(i).shape == graph.node(i).shape for i in n.inputs)
                          for g in graphs)]
    collectives = [n for n in graphs[0].nodes() if n.op in ("all_reduce", "all_gather")]
    per_token = 0
    for n in collectives:
        if n.op == "all_reduce":
            width = n.shape[-1] if isinstance(n.shape[-1], int) else 0
            per_token += width * to_torch_dtype(n.dtype).itemsize
    gather = [n for n in collectives if n.op == "all_gather"]
    logits_bytes = sum(n.attrs["size"] * to_torch_dtype(n.dtype).itemsize for n in gather)
    ranks = []
    for g, plan in zip(graphs, plans):
        heads = sorted({len(v) for v in plan.q_heads.values()})
        kv = sorted({len(v) for v in plan.kv_heads.values()})
        ranks.append({"rank": plan.rank, "weight_bytes": weight_bytes(g),
                      "q_heads_per_layer": heads, "kv_heads_per_layer": kv,
                      "mlp_channels": sorted(set(plan.mlp_channels)),
                      "vocab": list(plan.vocab)})
    report.changed = True
    report.stats = {"tp": tp, "all_reduces": sum(n.op == "all_reduce" for n in collectives),
                    "all_reduce_bytes_per_token": per_token,
                    "all_gather_bytes_per_sampled_token": logits_bytes}
    details = {**report.stats, "ranks": ranks, "replicated_linears": replicated}
    for g in graphs:
        g.meta["partition"] = {**g.meta["partition"], "report": details}
    report.notes.append(
        f"tp={tp}: {report.stats['all_reduces']} all-reduces "
        f"({per_token} bytes/token), weights per rank "
        + ", ".join(f"{r['weight_bytes'] / 2**20:.1f} MiB" for r in ranks))
    if replicated:
        report.notes.append(f"replicated (not split): {', '.join(replicated[:6])}")
    return graphs, report


def partition(graph: Graph, options: Any = None) -> tuple[Graph, PassReport]:
    """The pass: one graph per rank by --tp and --pp (tensor parallelism here, pipeline
    stages in pipeline_parallel), handed back in graph.meta["ranks"]: the passes before this
    one see the whole model, the driver runs those after it once per rank."""
    # Imported here: pipeline_parallel builds on this module's split.
    from llm_engine.builder.passes.pipeline_parallel import partition_pp, partition_tp_pp

    tp, pp = getattr(options, "tp", 1), getattr(options, "pp", 1)
    if tp == 1 and pp == 1:
        return graph, PassReport("partition", notes=["a single rank"])
    if pp == 1:
        ranks, report = partition_tp(graph, tp)
    elif tp == 1:
        ranks, report = partition_pp(graph, pp)
    else:
        ranks, report = partition_tp_pp(graph, tp, pp)
    graph.meta["ranks"] = ranks
    return graph, report
