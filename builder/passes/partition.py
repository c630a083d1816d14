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
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph, Node, WeightSpec
from llm_engine.builder.passes.report import PassReport
from llm_engine.kernels import formats
from llm_engine.kernels.dtypes import to_torch_dtype
from llm_engine.kernels.ops import OPS, VIEW_OPS

# Ops a head or channel split passes through unchanged (following their first input).
PASS_THROUGH = VIEW_OPS | {"to_dtype", "rope"}


@dataclass
class RankPlan:
    """What one rank holds; written into the partition report."""

    rank: int
    q_heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> global heads
    kv_heads: dict[int, list[int]] = field(default_factory=dict)
    mlp_channels: list[tuple[int, int]] = field(default_factory=list)  # per MLP: [lo, hi)
    vocab: tuple[int, int] = (0, 0)


def split_sizes(n: int, parts: int, unit: int = 1) -> list[int]:
    """Split n into `parts` contiguous sizes, multiples of `unit`, as equal as possible."""
    if n % unit:
        raise BuildError(f"cannot split {n} channels into multiples of {unit}")
    base, extra = divmod(n // unit, parts)
    sizes = [(base + (i < extra)) * unit for i in range(parts)]
    if min(sizes) == 0:
        raise BuildError(f"cannot split {n} channels over {parts} ranks"
                         + (f" in groups of {unit}" if unit > 1 else "")
                         + "; use a smaller --tp")
    return sizes


def _share(sizes: list[int], rank: int) -> range:
    lo = sum(sizes[:rank])
    return range(lo, lo + sizes[rank])


# ---- weight slicing --------------------------------------------------------------------------
def _weight(graph: Graph, name: str) -> tuple[Node, WeightSpec]:
    node = graph.node(name)
    if node.op != "weight":
        raise BuildError(f"tensor parallelism: {name} is computed, not a weight; this model's "
                         "projection cannot be split")
    return node, graph.weights[node.attrs["name"]]


class _Slicer:
    """Rewrites weight specs to slices of themselves, each weight at most once (a tied table
    is reached from the embedding and the LM head)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.done: dict[str, tuple[int, tuple[int, ...]]] = {}

    def take(self, node_name: str, dim: int, index: list[int], pad_to: int | None = None
             ) -> None:
        node, spec = _weight(self.graph, node_name)
        key = (dim, tuple(index) + ((pad_to,) if pad_to else ()))
        if spec.name in self.done:
            if self.done[spec.name] != key:
                raise BuildError(f"tensor parallelism: weight {spec.name} is shared by layers "
                                 "that need different splits")
            return
        self.done[spec.name] = key
        recipe: dict[str, Any] = {"take": spec.recipe, "dim": dim, "index": list(index)}
        shape = list(spec.shape)
        shape[dim] = len(index)
        if pad_to is not None and pad_to > len(index):
            recipe = {"pad": recipe, "dim": dim, "to": pad_to}
            shape[dim] = pad_to
        spec.recipe, spec.shape = recipe, tuple(shape)
        node.shape = tuple(shape)


def _operands(node: Node) -> tuple[formats.WeightFormat, list[str], str | None]:
    """(weight format, weight operands, bias) of a linear node."""
    fmt = formats.of(node.attrs)
    ops = node.inputs[1:1 + fmt.operands]
    bias = node.inputs[1 + fmt.operands] if len(node.inputs) > 1 + fmt.operands else None
    return fmt, ops, bias


def _take_out_rows(slicer: _Slicer, node: Node, index: list[int],
                   pad_to: int | None = None) -> None:
    fmt, ops, bias = _operands(node)
    for part, name in zip(fmt.parts, ops, strict=True):
        if part.rows:  # per-tensor parts (a static activation scale) stay whole
            slicer.take(name, 0, index, pad_to)
    if bias is not None:
        slicer.take(bias, 0, index, pad_to)


def _take_in_cols(slicer: _Slicer, node: Node, cols: range, keep_bias: bool) -> None:
    fmt, ops, bias = _operands(node)
    g = node.attrs.get("group_size") if fmt.grouped else None
    if g and (cols.start % g or len(cols) % g):
        what, other = ("fp8 activation group", ", or --fp8-act-scales per-token") \
            if fmt.activations else ("int4 group", "")
        raise BuildError(f"tensor parallelism: {node.name}'s input channels "
                         f"[{cols.start}, {cols.stop}) do not fall on {what} boundaries "
                         f"(group size {g}); rebuild with a --group-size dividing each rank's "
                         f"share{other}")
    for part, name in zip(fmt.parts, ops, strict=True):
        if part.cols == "channel":
            slicer.take(name, 1, list(cols))
        elif part.cols == "pair":
            slicer.take(name, 1, list(range(cols.start // 2, cols.stop // 2)))
        elif part.cols == "group":
            slicer.take(name, 1, list(range(cols.start // g, cols.stop // g)))
        # cols None: per-row scales and per-tensor parts stay whole
    if bias is not None and not keep_bias:
        slicer.graph.set_inputs(node, node.inputs[:-1])


def _insert_after(graph: Graph, node: Node, op: str, attrs: dict[str, Any]) -> Node:
    users = graph.users(node.name)
    new = graph.add(op, [node.name], node.shape, node.dtype, attrs=attrs, origin=node.origin,
                    name=f"{op}_{node.name}")
    for user in users:
        graph.set_inputs(user, [new.name if i == node.name else i for i in user.inputs])
    graph.outputs = [new.name if o == node.name else o for o in graph.outputs]
    return new


# ---- attention ---------------------------------------------------------------------------
def _walk_up(graph: Graph, name: str) -> tuple[Node, list[Node]]:
    """The linear producing `name` through pass-through ops, and the chain from it."""
    chain: list[Node] = []
    node = graph.node(name)
    while node.op != "linear":
        if node.op not in PASS_THROUGH:
            raise BuildError(f"tensor parallelism: attention input {name} comes from "
                             f"{node.op} {node.name}, not from a projection")
        chain.append(node)
        node = graph.node(node.inputs[0])
    return node, chain[::-1]


def _walk_down(graph: Graph, node: Node) -> tuple[Node, list[Node]]:
    chain: list[Node] = []
    while True:
        users = graph.users(node.name)
        if len(users) != 1:
            raise BuildError(f"tensor parallelism: attention output {node.name} has "
                             f"{len(users)} readers; expected one projection")
        user = users[0]
        if user.op == "linear" and user.inputs[0] == node.name:
            return user, chain
        if user.op not in PASS_THROUGH:
            raise BuildError(f"tensor parallelism: attention output flows into {user.op} "
                             f"{user.name}, not into a projection")
        chain.append(user)
        node = user


def _fix_reshapes(chain: list[Node], old: int, new: int, head_dim: int) -> None:
    """Replace an explicit head count (followed by head_dim) or width in reshape targets."""
    for node in chain:
        if node.op != "reshape":
            continue
        shape = list(node.attrs["shape"])
        for i, s in enumerate(shape):
            if s == old and i + 1 < len(shape) and shape[i + 1] == head_dim:
                shape[i] = new
            elif s == old * head_dim:
                shape[i] = new * head_dim
        node.attrs["shape"] = shape


def _set_width(nodes: list[Node], old: int, new: int) -> None:
    """Reshapes that keep a split dimension last: an explicit width there shrinks with it."""
    for node in nodes:
        if node.op == "reshape" and node.attrs["shape"][-1] == old:
            node.attrs["shape"] = [*node.attrs["shape"][:-1], new]


def _shard_attention(graph: Graph, attn: Node, tp: int, rank: int, slicer: _Slicer,
                     claimed: set[str], plan: RankPlan) -> None:
    heads, kv_heads, d = (attn.attrs["num_heads"], attn.attrs["num_kv_heads"],
                          attn.attrs["head_dim"])
    layer = attn.attrs["layer"]
    if heads < tp:
        raise BuildError(f"--tp {tp} exceeds the model's {heads} attention heads")
    group = heads // kv_heads
    q_local = list(_share(split_sizes(heads, tp), rank))
    kv_local = list(range(q_local[0] // group, q_local[-1] // group + 1))
    head_map = [h // group - kv_local[0] for h in q_local]
    per = len(q_local) // len(kv_local)
    uniform = len(q_local) % len(kv_local) == 0 and head_map == [i // per for i in
                                                                 range(len(q_local))]
    plan.q_heads[layer], plan.kv_heads[layer] = q_local, kv_local

    # Input side: each of q, k, v is (a slice of) a projection's output channels.
    by_linear: dict[str, list[tuple[int, Node | None, list[int]]]] = {}
    widened: dict[str, list[Node]] = {}  # reshapes between a projection and its q/k/v slices
    for which, name in enumerate(attn.inputs[:3]):
        linear, chain = _walk_up(graph, name)
        width = linear.shape[-1]
        pre = []
        while chain and chain[0].op == "reshape" and chain[0].shape[-1] == width:
            pre.append(chain.pop(0))
        widened[linear.name] = pre
        part = chain[0] if chain and chain[0].op == "slice" and \
            chain[0].attrs["dim"] in (-1, len(chain[0].shape) - 1) else None
        lo, hi = (part.attrs["start"], part.attrs["end"]) if part else (0, width)
        keep = q_local if which == 0 else kv_local
        count = heads if which == 0 else kv_heads
        if hi - lo != count * d:
            raise BuildError(f"tensor parallelism: layer {layer}'s {'qkv'[which]} input has "
                             f"{hi - lo} channels, expected {count} heads x {d}")
        rows = [lo + h * d + j for h in keep for j in range(d)]
        by_linear.setdefault(linear.name, []).append((lo, part, rows))
        _fix_reshapes(chain, count, len(keep), d)
    for lname, parts in by_linear.items():
        linear = graph.node(lname)
        pre = widened[lname]
        readers = {u.name for u in graph.users(pre[-1].name if pre else lname)}
        mine = {p.name for _, p, _ in parts if p is not None}
        if (any(p is None for _, p, _ in parts) and len(parts) > 1) or \
                (mine and readers != mine) or (not mine and len(readers) != 1):
            raise BuildError(f"tensor parallelism: projection {lname} has readers besides "
                             f"attention layer {layer}")
        index: list[int] = []
        for _, part, rows in sorted(parts, key=lambda p: p[0]):
            if part is not None:
                part.attrs["start"], part.attrs["end"] = len(index), len(index) + len(rows)
            index += rows
        _take_out_rows(slicer, linear, index)
        _set_width(pre, linear.shape[-1], len(index))
        claimed.add(lname)

    # Output side: the projection after attention takes this rank's heads' channels.
    out_proj, chain = _walk_down(graph, attn)
    _fix_reshapes(chain, heads, len(q_local), d)
    _take_in_cols(slicer, out_proj, range(q_local[0] * d, (q_local[-1] + 1) * d),
                  keep_bias=rank == 0)
    claimed.add(out_proj.name)
    _insert_after(graph, out_proj, "all_reduce", {})

    attn.attrs["num_heads"], attn.attrs["num_kv_heads"] = len(q_local), len(kv_local)
    attn.attrs["kv_head_map"] = None if uniform else head_map
    for key in ("k_scale", "v_scale"):
        if isinstance(attn.attrs.get(key), list):
            attn.attrs[key] = attn.attrs[key][kv_local[0]:kv_local[-1] + 1]
    layers = (graph.meta.get("kv_cache") or {}).get("layers")
    if layers is not None:
        layers[layer] = {**layers[layer], "num_kv_heads": len(kv_local)}


# ---- MLP ---------------------------------------------------------------------------------
def _elementwise(node: Node) -> bool:
    return node.op in ("gated_act", "pointwise", "to_dtype") or \
        OPS[node.op].kind == "elementwise"


def _keeps_last_dim(graph: Graph, node: Node) -> bool:
    return node.op == "reshape" and graph.node(node.inputs[0]).shape[-1] == node.shape[-1]


def _mlp_region(graph: Graph, down: Node) -> tuple[list[Node], list[Node]] | None:
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


def _shard_mlp(graph: Graph, down: Node, columns: list[Node], region: list[Node], tp: int,
               rank: int, slicer: _Slicer, claimed: set[str], plan: RankPlan) -> None:
    width = graph.node(down.inputs[0]).shape[-1]
    unit = (down.attrs.get("group_size") or 1) if formats.of(down.attrs).grouped else 1
    local = _share(split_sizes(width, tp, unit), rank)
    plan.mlp_channels.append((local.start, local.stop))
    for node in region:
        if node.op == "reshape":
            old = node.shape[-1]
            _set_width([node], old, len(local) * old // width)
    for col in columns:
        gated = _feeds_gated(graph, col)
        if gated:
            index = [*local, *(width + i for i in local)]
        else:
            index = list(local)
        if col.shape[-1] != (2 * width if gated else width):
            raise BuildError(f"tensor parallelism: MLP projection {col.name} has "
                             f"{col.shape[-1]} channels, expected {width}")
        _take_out_rows(slicer, col, index)
        claimed.add(col.name)
    for node in region:  # per-channel constants of the elementwise region (e.g. a bias)
        for i in node.inputs:
            producer = graph.node(i)
            if producer.op == "weight" and producer.shape and producer.shape[-1] == width:
                slicer.take(i, len(producer.shape) - 1, list(local))
    _take_in_cols(slicer, down, local, keep_bias=rank == 0)
    claimed.add(down.name)
    _insert_after(graph, down, "all_reduce", {})


# ---- vocabulary ----------------------------------------------------------------------------
def _shard_vocab(graph: Graph, tp: int, rank: int, slicer: _Slicer, claimed: set[str],
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
        _insert_after(graph, emb, "all_reduce", {})
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
    _take_out_rows(slicer, head, list(range(lo, hi)), pad_to=shard)
    claimed.add(head.name)
    plan.vocab = (lo, hi)
    _insert_after(graph, head, "all_gather", {"dim": len(head.shape) - 1, "size": vocab,
                                               "ranks": tp})


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
    slicer = _Slicer(g)
    claimed: set[str] = set()
    plan = RankPlan(rank)
    for attn in [n for n in g.nodes() if n.op == "paged_attention"]:
        _shard_attention(g, attn, tp, rank, slicer, claimed, plan)
    for node in g.nodes():
        if node.op != "linear" or node.name in claimed:
            continue
        found = _mlp_region(g, node)
        if found is not None and not any(c.name in claimed for c in found[0]):
            _shard_mlp(g, node, *found, tp, rank, slicer, claimed, plan)
    _shard_vocab(g, tp, rank, slicer, claimed, plan)
    g.dce()
    _reshape_nodes(g)
    g.meta["partition"] = {"tp": tp, "rank": rank}
    return g, plan


def weight_bytes(graph: Graph) -> int:
    return sum(math.prod(spec.shape) * to_torch_dtype(spec.dtype).itemsize
               for spec in graph.weights.values())


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
