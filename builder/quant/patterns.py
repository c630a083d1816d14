"""The graph shapes the quantize pass's smoothing folds and the rotation pass look for: which
weights a GEMM owns alone, reshapes that keep the channel dimension, and the V rows behind
attention's output."""

from __future__ import annotations

from dataclasses import dataclass

from llm_engine.builder.ir import Graph, Node


def only_user(graph: Graph, name: str, user: str) -> bool:
    return [u.name for u in graph.users(name)] == [user]


LAYOUT_OPS = ("reshape", "transpose")


def through_reshapes(graph: Graph, node: Node) -> Node:
    """Back through reshapes that keep the last (channel) dimension and are their input's only
    reader (GPT-2 flattens [1, T, C] to [T, C] around its GEMMs): a per-channel scale applies
    to the node returned exactly as to `node`."""
    while node.op == "reshape":
        src = graph.node(node.inputs[0])
        if len(graph.users(src.name)) != 1 or not src.shape or src.shape[-1] != node.shape[-1]:
            break
        node = src
    return node


def dense_weight_names(graph: Graph, linear: Node) -> list[str] | None:
    """The weight (and bias) tensor names of a dense linear whose tensors nothing else reads."""
    if linear.op != "linear" or linear.attrs.get("b_format", "dense") != "dense":
        return None
    targets = linear.inputs[1:]
    if not all(graph.node(t).op == "weight" and only_user(graph, t, linear.name)
               for t in targets):
        return None
    return [graph.node(t).attrs["name"] for t in targets]


@dataclass
class AttentionV:
    """Where o_proj's input comes from: the rows [start, end) of the dense linear whose weight
    (and bias) tensors are `names` hold V, `kv_heads` heads of `head_dim` read by `heads` query
    heads (query head h reads KV head h // (heads // kv_heads))."""

    names: list[str]
    start: int
    end: int
    heads: int
    kv_heads: int
    head_dim: int


def attention_v_rows(graph: Graph, act: Node) -> AttentionV | None:
    """o_proj's input is attention's output, heads side by side: softmax(qk) @ v per query
    head. The V rows behind the activation `act`, or None for any other shape."""
    node, seen = act, []
    while node.op in LAYOUT_OPS:
        seen.append(node)
        if len(graph.users(node.name)) != 1:
            return None
        node = graph.node(node.inputs[0])
    if node.op != "paged_attention" or len(graph.users(node.name)) != 1 or \
            [n.op for n in seen].count("transpose") != 1:
        return None
    attrs = node.attrs
    heads, kv_heads, d = attrs.get("num_heads"), attrs.get("num_kv_heads"), attrs.get("head_dim")
    if attrs.get("kv_head_map") is not None or not heads or not kv_heads or heads % kv_heads \
            or act.shape[-1] != heads * d:
        return None
    v = graph.node(node.inputs[2])  # back through the layout ops to V's rows of a linear
    while v.op in LAYOUT_OPS:
        if len(graph.users(v.name)) != 1:
            return None
        v = graph.node(v.inputs[0])
    rows = None
    if v.op == "slice":
        if len(graph.users(v.name)) != 1 or v.attrs.get("step", 1) != 1 or \
                v.attrs.get("dim") not in (-1, len(v.shape) - 1):
            return None
        rows = (v.attrs["start"], v.attrs["end"])
        v = graph.node(v.inputs[0])
        for u in graph.users(v.name):  # the other slices (q, k) must not overlap V's rows
            if u.op != "slice" or u.attrs.get("dim") not in (-1, len(u.shape) - 1) or \
                    (u.attrs["start"] < rows[1] and u.attrs["end"] > rows[0] and
                     (u.attrs["start"], u.attrs["end"]) != rows):
                return None
        v = through_reshapes(graph, v)
    elif len(graph.users(v.name)) != 1:
        return None
    names = dense_weight_names(graph, v)
    if names is None:
        return None
    start, end = rows or (0, kv_heads * d)
    if end - start != kv_heads * d:
        return None
    return AttentionV(names, start, end, heads, kv_heads, d)
