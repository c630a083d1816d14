"""Materialise engine weights from their recipes, one tensor at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from builder.ir import Graph, WeightSpec
from kernels.dtypes import to_torch_dtype

# Relative Frobenius error of each quantized weight, filled as weights are written.
QUANT_ERRORS: dict[str, float] = {}
_last_quant: tuple[str, dict[str, torch.Tensor]] | None = None


def materialize(recipe: dict, source, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    if "load" in recipe:
        return source.get(recipe["load"])
    if "buffer" in recipe:
        return buffers[recipe["buffer"]]
    if "t" in recipe:
        return materialize(recipe["t"], source, buffers).t().contiguous()
    if "quant" in recipe:
        return _quantized(recipe, source, buffers)[recipe["part"]]
    if "cat" in recipe:
        parts = [materialize(r, source, buffers) for r in recipe["cat"]]
        return torch.cat(parts, dim=recipe.get("dim", 0))
    raise ValueError(f"unknown weight recipe {recipe}")


def _quantized(recipe: dict, source, buffers) -> dict[str, torch.Tensor]:
    """Both parts (q, scale) of one quantized weight; the parts are written one after the
    other, so the last result is kept rather than quantizing twice."""
    global _last_quant
    import json

    from kernels import quant

    key = json.dumps([recipe["quant"], recipe["of"]], sort_keys=True)
    if _last_quant is not None and _last_quant[0] == key:
        return _last_quant[1]
    w = materialize(recipe["of"], source, buffers).float()
    if recipe["quant"] != "int8_channel":
        raise ValueError(f"unknown quantization {recipe['quant']!r}")
    q, scale = quant.quantize_int8_channel(w)
    err = (quant.dequantize_int8_channel(q, scale) - w).norm() / w.norm().clamp_min(1e-30)
    QUANT_ERRORS[_recipe_name(recipe["of"])] = round(err.item(), 6)
    _last_quant = (key, {"q": q, "scale": scale})
    return _last_quant[1]


def _recipe_name(recipe: dict) -> str:
    if "load" in recipe:
        return recipe["load"]
    if "buffer" in recipe:
        return recipe["buffer"]
    if "t" in recipe:
        return _recipe_name(recipe["t"])
    return "+".join(_recipe_name(r) for r in recipe.get("cat", []))


def make_weight(spec: WeightSpec, source, buffers) -> torch.Tensor:
    t = materialize(spec.recipe, source, buffers).to(to_torch_dtype(spec.dtype))
    if tuple(t.shape) != tuple(spec.shape):
        raise ValueError(f"weight {spec.name}: checkpoint gives {tuple(t.shape)}, "
                         f"graph expects {tuple(spec.shape)}")
    return t.contiguous()


def iter_weights(graph: Graph, source, buffers) -> Iterator[tuple[str, torch.Tensor]]:
    for name in sorted(graph.weights):
        yield name, make_weight(graph.weights[name], source, buffers)
