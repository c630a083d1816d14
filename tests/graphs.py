"""Small hand-built IR graphs and a tiny executor for them, shared by the pass unit tests.

Graphs are built node by node with `add_input` / `add_weight` / `add_op`; `add_op` infers a
node's shape and dtype from its torch reference op on meta tensors (at several token counts,
so a dimension that follows `T` or `N` is recorded symbolically), which keeps each test to
the few lines of its pattern. `run` executes a graph with the reference ops in `kernels.ops`,
materialising weights through their recipes, so a fused graph (whose weights were
concatenated) runs from the same checkpoint tensors as the graph it came from.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_engine.builder.ir import Graph, Node, WeightSpec
from llm_engine.builder.passes.fuse import RULES, fuse
from llm_engine.builder.passes.report import PassReport
from llm_engine.builder.verify import verify
from llm_engine.builder.weights import make_weight
from llm_engine.kernels.dtypes import dtype_name, to_torch_dtype
from llm_engine.kernels.ops import OPS
from llm_engine.kernels.symbolic import eval_shape, has_sym, resolve

# Shape inference probes: the base point, then T and N moved one at a time, so every
# dimension of the form c + a*T + b*N is recovered exactly.
_BASE = {"T": 3, "N": 2}
_MOVE_T = {"T": 5, "N": 2}
_MOVE_N = {"T": 3, "N": 7}


# ---- building -------------------------------------------------------------------------
def add_input(graph: Graph, name: str, shape: tuple, dtype: str = "float32") -> str:
    node = graph.add("input", [], tuple(shape), dtype, attrs={"name": name},
                     origin=[f"{name}@input"], name=name, order=-1.0)
    graph.inputs.append(node.name)
    return node.name


def add_weight(graph: Graph, name: str, shape: tuple[int, ...], dtype: str = "float32") -> str:
    spec = WeightSpec(name, tuple(shape), dtype, {"load": name})
    return graph.add_weight(spec, origin=[f"{name}@weight"]).name


def _meta_value(node: Node, env: dict[str, int]):
    def one(shape, dtype: str) -> torch.Tensor:
        dims = tuple(1 if s == -1 else s for s in eval_shape(shape, env))
        return torch.empty(dims, dtype=to_torch_dtype(dtype), device="meta")

    if isinstance(node.shape, list):
        return tuple(one(s, d) for s, d in zip(node.shape, node.dtype))
    return one(node.shape, node.dtype)


def _reference(graph: Graph, op: str, inputs: list[str], attrs: dict, env: dict[str, int]):
    args = [_meta_value(graph.node(i), env) for i in inputs]
    if op == "paged_attention":  # reads the KV cache; its output is shaped like q
        return torch.empty_like(args[0])
    return OPS[op].fn(*args, **resolve(attrs, env))


def _symbolic_dim(base: int, moved_t: int, moved_n: int) -> int | str:
    a = (moved_t - base) // (_MOVE_T["T"] - _BASE["T"])
    b = (moved_n - base) // (_MOVE_N["N"] - _BASE["N"])
    c = base - a * _BASE["T"] - b * _BASE["N"]
    if a == b == 0:
        return base
    terms = [f"{k}*{s}" if k != 1 else s for k, s in ((a, "T"), (b, "N")) if k]
    if c:
        terms.append(str(c))
    return " + ".join(terms)


def infer(graph: Graph, op: str, inputs: list[str], attrs: dict) -> tuple[Any, Any]:
    """(shape, dtype) of `op` applied to `inputs`, with T/N dimensions kept symbolic."""
    outs = [_reference(graph, op, inputs, attrs, env) for env in (_BASE, _MOVE_T, _MOVE_N)]

    def one(values: list[torch.Tensor]) -> tuple[tuple, str]:
        shape = tuple(_symbolic_dim(*dims) for dims in zip(*(v.shape for v in values)))
        return shape, dtype_name(values[0].dtype)

    if isinstance(outs[0], tuple):
        parts = [one([o[k] for o in outs]) for k in range(len(outs[0]))]
        return [s for s, _ in parts], [d for _, d in parts]
    return one(outs)


def add_op(graph: Graph, op: str, inputs: list[str], attrs: dict | None = None, *,
           shape=None, dtype=None, name: str | None = None) -> str:
    """Add one node; shape and dtype default to what the reference op produces. Each node's
    origin is unique, so tests can check that fusion carries origins over. An input that
    does not exist raises KeyError here (build malformed graphs by editing nodes instead)."""
    attrs = dict(attrs or {})
    name = graph.fresh(name or op)
    if shape is None or dtype is None:
        inferred_shape, inferred_dtype = infer(graph, op, inputs, attrs)
        shape = inferred_shape if shape is None else shape
        dtype = inferred_dtype if dtype is None else dtype
    # creation order breaks ties in the topological order, as the lowering's nodes do
    order = max((graph.node(n).order for n in graph.g), default=0.0) + 1.0
    return graph.add(op, inputs, shape, dtype, attrs=attrs, origin=[f"{name}@test"],
                     name=name, order=order).name


# ---- executing ------------------------------------------------------------------------
@dataclass
class KVContext:
    """The runtime state paged attention reads: one (key, value) cache pair per layer."""

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def kv_context(graph: Graph, num_blocks: int = 8, block_size: int = 4) -> KVContext:
    """Fresh zeroed caches for every layer recorded by the kv_cache pass, or for every
    paged_attention node of a hand-built graph."""
    layers = graph.meta.get("kv_cache", {}).get("layers")
    if layers is None:
        layers = [{"num_kv_heads": n.attrs["num_kv_heads"], "head_dim": n.attrs["head_dim"],
                   "dtype": graph.node(n.inputs[1]).dtype}
                  for n in graph.nodes() if n.op == "paged_attention"]
    caches = []
    for layer in layers:
        shape = (num_blocks, block_size, layer["num_kv_heads"], layer["head_dim"])
        dtype = to_torch_dtype(layer["dtype"])
        caches.append((torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)))
    return KVContext(caches)


def one_sequence_metadata(tokens: int, block_size: int = 4) -> dict[str, torch.Tensor]:
    """Paged-attention metadata for a single sequence prefilled from position 0, its blocks
    laid out in order from block 0."""
    blocks = (tokens + block_size - 1) // block_size
    return {
        "slot_mapping": torch.arange(tokens),
        "block_tables": torch.arange(blocks, dtype=torch.int32)[None],
        "context_lens": torch.tensor([tokens], dtype=torch.int32),
        "query_start_loc": torch.tensor([0, tokens], dtype=torch.int32),
    }


def _sizes(graph: Graph, feeds: dict[str, torch.Tensor]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name in graph.inputs:
        node = graph.node(name)
        for dim, size in zip(node.shape, feeds[node.attrs["name"]].shape):
            if dim in ("T", "N"):
                sizes[dim] = int(size)
    return sizes


def run(graph: Graph, feeds: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
        ctx: Any = None) -> list[torch.Tensor]:
    """Execute `graph` with the reference ops; returns its outputs in order. `weights` maps
    checkpoint names to tensors (the `load` leaves of the weight recipes)."""
    sizes = _sizes(graph, feeds)
    values: dict[str, Any] = {}
    for node in graph.nodes():
        if node.op == "input":
            values[node.name] = feeds[node.attrs["name"]]
        elif node.op == "weight":
            values[node.name] = make_weight(graph.weights[node.attrs["name"]], weights, {})
        else:
            attrs = resolve(node.attrs, sizes) if has_sym(node.attrs) else node.attrs
            args = [values[i] for i in node.inputs]
            if OPS[node.op].needs_ctx:
                values[node.name] = OPS[node.op].fn(*args, ctx=ctx, **attrs)
            else:
                values[node.name] = OPS[node.op].fn(*args, **attrs)
    return [values[o] for o in graph.outputs]


def random_feeds(graph: Graph, sizes: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float inputs at the given T/N (integer inputs must be fed by the test)."""
    g = torch.Generator().manual_seed(seed)
    feeds = {}
    for name in graph.inputs:
        node = graph.node(name)
        dtype = to_torch_dtype(node.dtype)
        if dtype.is_floating_point:
            shape = eval_shape(node.shape, sizes)
            feeds[node.attrs["name"]] = torch.randn(shape, generator=g).to(dtype)
    return feeds


def random_weights(graph: Graph, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random tensor for every checkpoint weight the graph loads."""
    g = torch.Generator().manual_seed(seed)
    return {spec.name: torch.randn(spec.shape, generator=g).to(to_torch_dtype(spec.dtype))
            for spec in graph.weights.values() if "load" in spec.recipe}


def copy_graph(graph: Graph) -> Graph:
    """A deep copy, so a test can run a pass and still execute the graph it started from."""
    new = Graph()
    for node in graph.g:
        new.g.add_node(node, node=copy.deepcopy(graph.node(node)))
    new.g.add_edges_from(graph.g.edges)
    new.inputs, new.outputs = list(graph.inputs), list(graph.outputs)
    new.weights = copy.deepcopy(graph.weights)
    new.meta = copy.deepcopy(graph.meta)
    return new


# ---- fusion ---------------------------------------------------------------------------
RULE_NAMES = tuple(rule.name for rule in RULES)


def fuse_only(graph: Graph, *rules: str) -> PassReport:
    """Run the fuse pass with every rule but `rules` disabled, verifying after each rule."""
    disabled = frozenset(RULE_NAMES) - set(rules)
    _, report = fuse(graph, disabled=disabled, verify_each=verify)
    return report
