"""Tensor-parallel attention: each rank keeps whole query heads and the KV heads they read.

The projections feeding a `paged_attention` node are found by walking up through view ops
(not by module name, so fused qkv, separate q/k/v and GPT-2's c_attn all work) and split by
output channels; the projection after it is split by input channels and followed by an
`all_reduce`. Reshapes in between that spell out a head count are rewritten to the rank's.
"""

from __future__ import annotations

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph, Node
from llm_engine.builder.passes.partition_slicing import (
    PASS_THROUGH,
    RankPlan,
    Slicer,
    insert_after,
    set_width,
    share,
    split_sizes,
    take_in_cols,
    take_out_rows,
)


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


def shard_attention(graph: Graph, attn: Node, tp: int, rank: int, slicer: Slicer,
                    claimed: set[str], plan: RankPlan) -> None:
    heads, kv_heads, d = (attn.attrs["num_heads"], attn.attrs["num_kv_heads"],
                          attn.attrs["head_dim"])
    layer = attn.attrs["layer"]
    if heads < tp:
        raise BuildError(f"--tp {tp} exceeds the model's {heads} attention heads")
    group = heads // kv_heads
    q_local = list(share(split_sizes(heads, tp), rank))
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
        take_out_rows(slicer, linear, index)
        set_width(pre, linear.shape[-1], len(index))
        claimed.add(lname)

    # Output side: the projection after attention takes this rank's heads' channels.
    out_proj, chain = _walk_down(graph, attn)
    _fix_reshapes(chain, heads, len(q_local), d)
    take_in_cols(slicer, out_proj, range(q_local[0] * d, (q_local[-1] + 1) * d),
                 keep_bias=rank == 0)
    claimed.add(out_proj.name)
    insert_after(graph, out_proj, "all_reduce", {})

    attn.attrs["num_heads"], attn.attrs["num_kv_heads"] = len(q_local), len(kv_local)
    attn.attrs["kv_head_map"] = None if uniform else head_map
    for key in ("k_scale", "v_scale"):
        if isinstance(attn.attrs.get(key), list):
            attn.attrs[key] = attn.attrs[key][kv_local[0]:kv_local[-1] + 1]
    if isinstance(attn.attrs.get("alibi"), list):  # slopes per query head: this rank's
        attn.attrs["alibi"] = [attn.attrs["alibi"][h] for h in q_local]
    layers = (graph.meta.get("kv_cache") or {}).get("layers")
    if layers is not None:
        layers[layer] = {**layers[layer], "num_kv_heads": len(kv_local)}
