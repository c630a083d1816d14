"""Tensor parallelism's shared tools: how many channels each rank gets, and how a weight
becomes one rank's slice of itself.

The attention, MLP and vocabulary sharding (partition_attention.py, partition_mlp.py,
partition_vocab.py) all cut weights the same way; keeping the cutting here means a quantized
format's layout (which operands have rows, which columns are channels, pairs or groups) is
handled in one place. A weight is not copied: its recipe gains a `take` (and for vocabulary
shards a `pad`) that builder/weights.py applies when it materialises the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph, Node, WeightSpec
from llm_engine.kernels import formats
from llm_engine.kernels.dtypes import to_torch_dtype
from llm_engine.kernels.ops import VIEW_OPS

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


def share(sizes: list[int], rank: int) -> range:
    lo = sum(sizes[:rank])
    return range(lo, lo + sizes[rank])


# ---- weight slicing --------------------------------------------------------------------------
def _weight(graph: Graph, name: str) -> tuple[Node, WeightSpec]:
    node = graph.node(name)
    if node.op != "weight":
        raise BuildError(f"tensor parallelism: {name} is computed, not a weight; this model's "
                         "projection cannot be split")
    return node, graph.weights[node.attrs["name"]]


class Slicer:
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


def take_out_rows(slicer: Slicer, node: Node, index: list[int],
                  pad_to: int | None = None) -> None:
    fmt, ops, bias = _operands(node)
    for part, name in zip(fmt.parts, ops, strict=True):
        if part.rows:  # per-tensor parts (a static activation scale) stay whole
            slicer.take(name, 0, index, pad_to)
    if bias is not None:
        slicer.take(bias, 0, index, pad_to)


def take_in_cols(slicer: Slicer, node: Node, cols: range, keep_bias: bool) -> None:
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


def insert_after(graph: Graph, node: Node, op: str, attrs: dict[str, Any]) -> Node:
    users = graph.users(node.name)
    new = graph.add(op, [node.name], node.shape, node.dtype, attrs=attrs, origin=node.origin,
                    name=f"{op}_{node.name}")
    for user in users:
        graph.set_inputs(user, [new.name if i == node.name else i for i in user.inputs])
    graph.outputs = [new.name if o == node.name else o for o in graph.outputs]
    return new


def set_width(nodes: list[Node], old: int, new: int) -> None:
    """Reshapes that keep a split dimension last: an explicit width there shrinks with it."""
    for node in nodes:
        if node.op == "reshape" and node.attrs["shape"][-1] == old:
            node.attrs["shape"] = [*node.attrs["shape"][:-1], new]


def weight_bytes(graph: Graph) -> int:
    return sum(math.prod(spec.shape) * to_torch_dtype(spec.dtype).itemsize
               for spec in graph.weights.values())
