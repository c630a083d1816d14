"""Which kernel family implements which IR op, behind one interface for codegen and runtime.

A family module decides per node whether it can implement it (`params` returns None when
not: the checker) and renders one or more templates for those parameters. Codegen groups the
nodes with equal (family, params) and renders them once; the runtime re-renders from the
recorded family, params and nodes to check an engine's stored source, then binds a callable
with the reference op's calling convention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_engine.kernels.codegen import load_kernel
from llm_engine.kernels.triton import attention, embedding, gated_act, gemm, moe, norm, pointwise

FAMILIES = {
    "linear": gemm,
    "matmul": gemm,
    "rms_norm": norm,
    "layer_norm": norm,
    "add_rms_norm": norm,
    "add_layer_norm": norm,
    "gated_act": gated_act,
    "embedding": embedding,
    "pointwise": pointwise,
    "paged_attention": attention,
    "moe": moe,
}
# Elementwise ops the pointwise template also covers when they were left unfused.
for _op in ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "neg", "rsqrt", "sqrt",
            "exp", "log", "tanh", "sigmoid", "silu", "relu", "cos", "sin", "abs", "reciprocal",
            "erf", "gelu", "to_dtype"):
    FAMILIES.setdefault(_op, pointwise)

DEFAULT_BLOCK_SIZE = 16


def family_name(module: Any) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def choose(op: str, attrs: dict[str, Any], in_shapes: list[tuple], in_dtypes: list[str],
           out_dtype: Any, *, kv_cache_dtype: str | None = None,
           block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[str, dict[str, Any]] | None:
    """(family, params) for a node, or None: no family takes it and it keeps its reference."""
    module = FAMILIES.get(op)
    if module is None:
        return None
    try:
        if module is attention:
            p = attention.params(attrs, in_shapes[0], kv_cache_dtype or in_dtypes[0],
                                 in_dtypes[0], block_size)
        else:
            p = module.params(op, attrs, in_shapes, in_dtypes, out_dtype)
    except (KeyError, TypeError, ValueError):  # a shape the checker did not anticipate
        return None
    return None if p is None else (family_name(module), p)


def same_kernel(family: str, recorded: dict[str, Any], derived: dict[str, Any]) -> bool:
    """Whether an engine's recorded params are what the family's checker derives from the
    plan node: equal, except a GEMM tiling, which the build host chose (or timed) among the
    template's candidates and need only be one of them."""
    if family != family_name(gemm):
        return recorded == derived
    tile = set(gemm.TILE_KEYS)
    return ({k: v for k, v in recorded.items() if k not in tile}
            == {k: v for k, v in derived.items() if k not in tile}
            and gemm.tiling_allowed(recorded))


def render(family: str, p: dict[str, Any], nodes: list[str] | None = None) -> dict[str, str]:
    """Template name -> source for one (family, params)."""
    module = _module(family)
    if module is attention:
        return attention.sources(p, nodes)
    return {module.TEMPLATE: module.source(p, nodes)}


def bind(family: str, p: dict[str, Any], sources: dict[str, str]) -> Callable[..., Any]:
    """A callable with the reference op's convention, from already verified sources."""
    modules = {name: load_kernel(src) for name, src in sources.items()}
    if _module(family) is attention:
        return attention.Launcher(p, modules=modules)
    (module,) = modules.values()
    return module.launch


def _module(family: str):
    for module in set(FAMILIES.values()):
        if family_name(module) == family:
            return module
    raise KeyError(f"unknown kernel family {family!r}")
