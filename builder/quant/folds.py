"""Where the quantize pass stores and folds: the graph's weight values during the pass, the
groups of linears that read one activation, how a per-channel 1/s is folded exactly into that
activation's producer, which weights are tables (embeddings, the LM head), and the
--quant-exclude patterns.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph, Node, WeightSpec
from llm_engine.builder.quant import calibrate as cal
from llm_engine.builder.quant.patterns import (
    LAYOUT_OPS,
    attention_v_rows,
    dense_weight_names,
    only_user,
    through_reshapes,
)
from llm_engine.builder.quant.rotate import is_rotation_linear
from llm_engine.kernels.ops import OPS, VIEW_OPS

if TYPE_CHECKING:
    from llm_engine.builder.passes.quantize import QuantEnv


@dataclass
class Group:
    """The linears that read one activation, and how to fold 1/s into its producer. `tie`
    maps a per-channel [K] tensor to one whose channels are equal wherever the fold needs
    them equal (the query heads sharing a KV head), or is None when every channel is free."""

    act: str
    linears: list[str]
    fold: Callable[[torch.Tensor], None] | None
    tie: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Exclusions:
    """`--quant-exclude` patterns, matched against a weight's name, the HF modules it came from
    and their parents, so that `lm_head` or `model.layers.3.mlp` work as written (a tied
    `lm_head` is the embedding table; both stay in full precision)."""

    patterns: tuple[str, ...]
    matched: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)
    kept: int = 0

    def __call__(self, names: list[str]) -> bool:
        cands = [c for n in names for c in _candidates(n)]
        self.seen.update(cands)
        hits = {p for c in cands for p in self.patterns if fnmatch.fnmatch(c, p)}
        self.matched |= hits
        self.kept += bool(hits)
        return bool(hits)

    def check(self) -> None:
        unmatched = [p for p in self.patterns if p not in self.matched]
        if unmatched:
            near = difflib.get_close_matches(unmatched[0], sorted(self.seen), n=3) or \
                sorted(self.seen, key=lambda n: (-n.count("."), n))[:1]
            raise BuildError(f"--quant-exclude {unmatched[0]!r} matches no quantized weight; "
                             "patterns are fnmatch globs over weight and module names such as "
                             + ", ".join(repr(n) for n in near))


def _candidates(name: str) -> list[str]:
    """`name` plus, for an origin `node@module` or a parameter `module.weight`, the module and
    each of its parents."""
    module = name.partition("@")[2] if "@" in name else name.removesuffix(".weight")
    parts = module.split(".")
    return [name, *(".".join(parts[:i]) for i in range(len(parts), 0, -1))]


class Weights:
    """The graph's weight values during the pass, and their writes back to the graph."""

    def __init__(self, graph: Graph, env: QuantEnv, values: dict[str, torch.Tensor]) -> None:
        self.graph, self.env, self.values = graph, env, values

    def set(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.graph.weights[name]
        key = f"quant:{name}"
        tensor = tensor.to(self.values[name].dtype).contiguous()
        self.env.buffers[key] = tensor
        self.values[name] = tensor
        spec.recipe = {"buffer": key}

    def add(self, name: str, tensor: torch.Tensor, origin: list[str]) -> Node:
        from llm_engine.kernels.dtypes import dtype_name

        key = f"quant:{name}"
        tensor = tensor.contiguous()
        self.env.buffers[key] = tensor
        self.values[name] = tensor
        return self.graph.add_weight(WeightSpec(name, tuple(tensor.shape), dtype_name(tensor.dtype),
                                                {"buffer": key}), origin=origin)


def _fold_attention_v(graph: Graph, w: Weights, act: Node) \
        -> tuple[Callable[[torch.Tensor], None], Callable[[torch.Tensor], torch.Tensor]] | None:
    """Dividing the V rows of KV head j by s divides every query head that reads KV head j by
    the same s, so an o_proj scale is exact when it is equal across the query heads of one KV
    group (GQA) — `tie` makes it so. Returns (fold, tie), or None when `act` is not
    attention's output."""
    found = attention_v_rows(graph, act)
    if found is None:
        return None
    kv_heads, d, start, end = found.kv_heads, found.head_dim, found.start, found.end
    rep = found.heads // kv_heads

    def tie(t: torch.Tensor) -> torch.Tensor:
        per_kv = t.reshape(kv_heads, rep, d).mean(dim=1, keepdim=True)
        return per_kv.expand(kv_heads, rep, d).reshape(-1).to(t.dtype)

    def fold_v(s: torch.Tensor) -> None:
        s_kv = s.reshape(kv_heads, rep, d)[:, 0].reshape(-1)  # tied: any head of the group
        for name in found.names:  # the weight [N, K] and the bias [N]: scale V's rows
            t = w.values[name].float().clone()
            t[start:end] = t[start:end] / (s_kv[:, None] if t.dim() == 2 else s_kv)
            w.set(name, t)

    return fold_v, tie


def fold_target(graph: Graph, w: Weights, act: str, readers: list[str]) \
        -> tuple[Callable[[torch.Tensor], None] | None, Callable | None]:
    """A function that divides the activation `act` by s (per channel) at its producer, and
    the tie its s must satisfy (or None); (None, None) when that cannot be done exactly."""
    if sorted(u.name for u in graph.users(act)) != sorted(readers):
        return None, None
    p = graph.node(act)
    if p.op in LAYOUT_OPS:
        found = _fold_attention_v(graph, w, p)
        if found is not None:
            return found
        p = through_reshapes(graph, p)
    norm, w_i, b_i = None, 0, None
    if p.op == "getitem" and p.attrs.get("index") == 0:
        base = graph.node(p.inputs[0])
        if base.op in ("add_rms_norm", "add_layer_norm"):
            norm, w_i, b_i = base, 2, 3 if base.op == "add_layer_norm" else None
    elif p.op in ("rms_norm", "layer_norm"):
        norm, w_i, b_i = p, 1, 2 if p.op == "layer_norm" else None
    if norm is not None:
        targets = [norm.inputs[i] for i in (w_i, b_i) if i is not None and i < len(norm.inputs)]
        if not all(graph.node(t).op == "weight" and only_user(graph, t, norm.name)
                   for t in targets):
            return None, None
        names = [graph.node(t).attrs["name"] for t in targets]

        def fold_norm(s: torch.Tensor) -> None:
            for name in names:
                w.set(name, w.values[name].float() / s)

        return fold_norm, None
    if p.op == "gated_act":
        up = graph.node(p.inputs[0])
        names = dense_weight_names(graph, up) if only_user(graph, up.name, p.name) else None
        if names is None:
            return None, None

        def fold_up(s: torch.Tensor) -> None:
            for name in names:  # the weight [2I, K] and the bias [2I]: scale the up half
                t = w.values[name].float().clone()
                half = t.shape[0] // 2
                t[half:] = t[half:] / (s[:, None] if t.dim() == 2 else s)
                w.set(name, t)

        return fold_up, None
    return None, None


def lm_heads(graph: Graph) -> list[Node]:
    """The linears that make the graph's outputs (the logits), found by walking back from each
    output through ops that only move, cast or map values one by one (a soft-cap)."""
    heads = []
    for out in graph.outputs:
        node = graph.node(out)
        while node.inputs and (node.op in VIEW_OPS or node.op in ("getitem", "pointwise")
                               or getattr(OPS.get(node.op), "kind", "") == "elementwise"):
            node = graph.node(node.inputs[0])
        if node.op == "linear" and node not in heads:
            heads.append(node)
    return heads


def table_users(graph: Graph) -> dict[str, list[Node]]:
    """Weight nodes read by an embedding (and any linear sharing it, a tied LM head) or by
    an LM head: weight node name -> its users."""
    tables: dict[str, list[Node]] = {}
    for node in graph.nodes():
        if node.op == "embedding" and node.attrs.get("b_format", "dense") == "dense":
            tables[node.inputs[0]] = graph.users(node.inputs[0])
    for head in lm_heads(graph):
        tables.setdefault(head.inputs[1], graph.users(head.inputs[1]))
    return tables


def groups(graph: Graph, w: Weights, excluded: Exclusions, tables: dict,
            fold_v: bool) -> list[Group]:
    groups = []
    for act, readers in cal.linear_inputs(graph).items():
        mine = []
        for name in readers:
            node = graph.node(name)
            wnode = graph.producer(node, 1)
            if wnode.name in tables or is_rotation_linear(graph, node):
                continue
            if excluded([wnode.attrs["name"], *wnode.origin, *node.origin]):
                continue
            mine.append(name)
        if mine:
            fold, tie = fold_target(graph, w, act, readers) if mine == readers else (None, None)
            if tie is not None and not fold_v:
                fold = tie = None
            groups.append(Group(act, mine, fold, tie))
    return groups


