"""The IR: a dataflow graph on networkx with typed nodes and weights referenced by name.

Each node holds an op from the closed set in `kernels.ops.OPS`, its ordered inputs (edges
carry no order in networkx, so the node keeps the list), attributes, a shape whose entries are
ints or expressions of the token dimension `T`, a dtype, and its origin: the traced nodes and
HF module paths it was made from, so an error in a fused kernel leads back to model code.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

Shape = tuple[int | str, ...]


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any]
    shape: Shape | list[Shape]  # a list of shapes for multi-output ops
    dtype: str | list[str]
    origin: list[str] = field(default_factory=list)
    order: float = 0.0  # tie-break for a stable topological order


@dataclass
class WeightSpec:
    """A tensor of the engine's weight file and how to make it from the checkpoint.

    `recipe` is a small tree: `{"load": name}`, `{"t": r}` (transpose),
    `{"cat": [r, ...], "dim": d}`, `{"fold": op, "attrs": {...}, "of": [r, ...]}` (an IR op
    over weights, passes/fold_weights.py); the writer materialises it tensor by tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    recipe: dict


class Graph:
    def __init__(self) -> None:
        self.g = nx.DiGraph()
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.weights: dict[str, WeightSpec] = {}
        self.meta: dict[str, Any] = {}
        self._names = itertools.count()

    # ---- access -------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        return self.g.nodes[name]["node"]

    def __contains__(self, name: str) -> bool:
        return name in self.g

    def __len__(self) -> int:
        return self.g.number_of_nodes()

    def nodes(self) -> list[Node]:
        """Nodes in a stable topological order."""
        key = {n: (self.node(n).order, n) for n in self.g}
        return [self.node(n) for n in nx.lexicographical_topological_sort(self.g, key=key.get)]

    def users(self, name: str) -> list[Node]:
        return [self.node(u) for u in self.g.successors(name)]

    def producer(self, node: Node, i: int) -> Node:
        return self.node(node.inputs[i])

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.g:
            op = self.node(n).op
            counts[op] = counts.get(op, 0) + 1
        return dict(sorted(counts.items()))

    # ---- mutation -----------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name = base
        while name in self.g:
            name = f"{base}_{next(self._names)}"
        return name

    def add(self, op: str, inputs: list[str], shape, dtype, *, attrs: dict | None = None,
            origin: list[str] | None = None, name: str | None = None,
            order: float | None = None) -> Node:
        name = self.fresh(name or op)
        if order is None:
            order = max((self.node(i).order for i in inputs), default=0.0) + 1e-3
        node = Node(name, op, list(inputs), dict(attrs or {}), shape, dtype,
                    list(origin or []), order)
        self.g.add_node(name, node=node)
        for i in inputs:
            self.g.add_edge(i, name)
        return node

    def set_inputs(self, node: Node, inputs: list[str]) -> None:
        for i in set(node.inputs) - set(inputs):
            self.g.remove_edge(i, node.name)
        node.inputs = list(inputs)
        for i in inputs:
            self.g.add_edge(i, node.name)

    def replace_uses(self, old: str, new: str) -> None:
        for user in self.users(old):
            self.set_inputs(user, [new if i == old else i for i in user.inputs])
        self.outputs = [new if o == old else o for o in self.outputs]

    def remove(self, name: str) -> None:
        self.g.remove_node(name)

    def dce(self) -> int:
        """Remove nodes nothing depends on; returns how many were removed."""
        live = set(self.outputs)
        for out in self.outputs:
            live |= nx.ancestors(self.g, out)
        dead = [n for n in self.g if n not in live and n not in self.inputs]
        self.g.remove_nodes_from(dead)
        used = {self.node(n).attrs["name"] for n in self.g if self.node(n).op == "weight"}
        self.weights = {k: v for k, v in self.weights.items() if k in used}
        return len(dead)

    def add_weight(self, spec: WeightSpec, origin: list[str] | None = None) -> Node:
        self.weights.setdefault(spec.name, spec)
        return self.add("weight", [], spec.shape, spec.dtype, attrs={"name": spec.name},
                        origin=origin, name=spec.name.replace(".", "_"), order=-1.0)
