"""Materialise engine weights from their recipes, one tensor at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llm_engine.builder.ir import Graph, WeightSpec
from llm_engine.kernels.dtypes import to_torch_dtype


def materialize(recipe: dict, source, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    if "load" in recipe:
        return source.get(recipe["load"])
    if "buffer" in recipe:
        return buffers[recipe["buffer"]]
    if "t" in recipe:
        return materialize(recipe["t"], source, buffers).t().contiguous()
    if "cat" in recipe:
        parts = [materialize(r, source, buffers) for r in recipe["cat"]]
        return torch.cat(parts, dim=recipe.get("dim", 0))
    if "take" in recipe:  # a tensor-parallel shard: chosen rows or columns
        t = materialize(recipe["take"], source, buffers)
        index = torch.tensor(recipe["index"], dtype=torch.long)
        return t.index_select(recipe["dim"], index)
    if "pad" in recipe:  # zero rows that bring a vocabulary shard to its equal length
        t = materialize(recipe["pad"], source, buffers)
        dim = recipe["dim"]
        shape = list(t.shape)
        shape[dim] = recipe["to"] - shape[dim]
        return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=dim)
    if "fold" in recipe:  # an op over weights, done at build time (passes/fold_weights.py)
        from llm_engine.kernels.ops import OPS

        parts = [materialize(r, source, buffers) for r in recipe["of"]]
        return OPS[recipe["fold"]].fn(*parts, **recipe["attrs"]).contiguous()
    raise ValueError(f"unknown weight recipe {recipe}")


def make_weight(spec: WeightSpec, source, buffers) -> torch.Tensor:
    t = materialize(spec.recipe, source, buffers).to(to_torch_dtype(spec.dtype))
    if tuple(t.shape) != tuple(spec.shape):
        raise ValueError(f"weight {spec.name}: checkpoint gives {tuple(t.shape)}, "
                         f"graph expects {tuple(spec.shape)}")
    return t.contiguous()


def iter_weights(graph: Graph, source, buffers) -> Iterator[tuple[str, torch.Tensor]]:
    for name in sorted(graph.weights):
        yield name, make_weight(graph.weights[name], source, buffers)
