"""The graph verifier: run after every pass, it rejects any graph the runtime could not run.

Structure (closed op set, arity, known inputs, no cycles, weights that exist with the shapes
the nodes claim) and semantics: every node's recorded shape and dtype must equal what its
torch reference op produces on meta tensors, checked at two token counts so that a shape
that should follow T but was frozen to a constant is caught.
"""

from __future__ import annotations

import networkx as nx
import torch

from llm_engine.builder.ir import Graph, Node
from llm_engine.kernels.dtypes import to_torch_dtype
from llm_engine.kernels.ops import OPS
from llm_engine.kernels.symbolic import eval_shape, resolve

PROBES = ({"T": 3, "N": 2}, {"T": 5, "N": 3})


class VerifyError(ValueError):
    pass


def _meta(shape, dtype: str, env) -> torch.Tensor:
    dims = tuple(1 if s == -1 else s for s in eval_shape(shape, env))
    return torch.empty(dims, dtype=to_torch_dtype(dtype), device="meta")


def _expected(node: Node, values: dict, env):
    if node.op in ("input", "weight"):
        return _meta(node.shape, node.dtype, env)
    args = [values[i] for i in node.inputs]
    if node.op in ("paged_attention", "all_reduce"):
        return torch.empty_like(args[0])
    if node.op == "all_gather":
        dim, size = node.attrs["dim"], node.attrs["size"]
        return torch.cat([args[0]] * node.attrs["ranks"], dim=dim).narrow(dim, 0, size)
    attrs = resolve(node.attrs, env)
    return OPS[node.op].fn(*args, **attrs)


def _check_value(node: Node, value, env) -> None:
    shapes = node.shape if isinstance(node.shape, list) else [node.shape]
    dtypes = node.dtype if isinstance(node.dtype, list) else [node.dtype]
    values = value if isinstance(value, tuple) else (value,)
    if len(values) != len(shapes):
        raise VerifyError(f"{node.name} ({node.op}): {len(values)} outputs, {len(shapes)} recorded")
    for v, shape, dtype in zip(values, shapes, dtypes):
        want = tuple(1 if s == -1 else s for s in eval_shape(shape, env))
        if tuple(v.shape) != want or v.dtype != to_torch_dtype(dtype):
            raise VerifyError(
                f"{node.name} ({node.op}): reference gives {tuple(v.shape)} {v.dtype}, "
                f"graph records {want} {dtype} at {env}"
            )


def verify(graph: Graph, *, semantic: bool = True) -> None:
    if not nx.is_directed_acyclic_graph(graph.g):
        raise VerifyError(f"graph has a cycle: {nx.find_cycle(graph.g)}")
    for name in graph.g:
        if "node" not in graph.g.nodes[name]:
            # networkx creates a bare node for an edge to a missing name (set_inputs with a
            # typo, add with an explicit order): report the dangling input, not a KeyError.
            users = ", ".join(sorted(graph.g.successors(name)))
            raise VerifyError(f"{users}: input {name!r} does not exist")
        node = graph.node(name)
        if node.op not in OPS:
            raise VerifyError(f"{name}: op {node.op!r} is not in the IR op set")
        lo, hi = OPS[node.op].arity
        if not lo <= len(node.inputs) <= hi:
            raise VerifyError(f"{name} ({node.op}): {len(node.inputs)} inputs, expected {lo}..{hi}")
        for i in node.inputs:
            if i not in graph:
                raise VerifyError(f"{name}: input {i!r} does not exist")
        if set(graph.g.predecessors(name)) != set(node.inputs):
            raise VerifyError(f"{name}: edges disagree with its input list")
        if node.op == "weight":
            spec = graph.weights.get(node.attrs.get("name"))
            if spec is None:
                raise VerifyError(f"{name}: weight {node.attrs.get('name')!r} is not declared")
            if tuple(spec.shape) != tuple(node.shape) or spec.dtype != node.dtype:
                raise VerifyError(f"{name}: weight node {node.shape} {node.dtype} but "
                                  f"declared {spec.shape} {spec.dtype}")
    for name in [*graph.inputs, *graph.outputs]:
        if name not in graph:
            raise VerifyError(f"graph input/output {name!r} does not exist")
    if semantic:
        order = graph.nodes()
        for env in PROBES:
            values: dict = {}
            for node in order:
                try:
                    values[node.name] = _expected(node, values, env)
                except VerifyError:
                    raise
                except Exception as e:
                    raise VerifyError(f"{node.name} ({node.op}) fails on meta tensors: {e}") from e
                _check_value(node, values[node.name], env)
