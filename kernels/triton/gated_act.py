"""Gated MLP activation: act(gate) * up over the two halves of the last dimension.

Reads the fused gate/up GEMM output [..., 2*I] once and writes [..., I]. Each program covers
BLOCK columns of one row. Rounding follows `kernels.ops.gated_act`: act(gate) is rounded to the
input dtype before it multiplies `up`, as two torch ops would.
"""

from __future__ import annotations

from llm_engine.kernels import codegen
from llm_engine.kernels.triton import next_pow2, row_num_warps

TEMPLATE = "gated_act"

ACTS = ("silu", "gelu", "gelu_tanh", "relu")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
MAX_BLOCK = 1024  # columns per program; wider rows use a second grid dimension



def params(op: str, attrs: dict, in_shapes: list[tuple], in_dtypes: list[str],
           out_dtype: str | list[str]) -> dict | None:
    """Template parameters for a gated_act node, or None where this family cannot run it."""
    if op != "gated_act" or set(attrs) != {"act"} or attrs["act"] not in ACTS:
        return None
    if len(in_shapes) != 1 or len(in_dtypes) != 1:
        return None
    dtype = in_dtypes[0]
    if dtype not in FLOAT_DTYPES or out_dtype != dtype:
        return None
    shape = tuple(in_shapes[0])
    width = shape[-1] if shape else None
    if not isinstance(width, int) or isinstance(width, bool) or width < 2 or width % 2:
        return None
    inter = width // 2
    block = min(next_pow2(inter), MAX_BLOCK)
    return {
        "op": op,
        "act": attrs["act"],
        "dtype": dtype,
        "inter": inter,
        "BLOCK": block,
        "num_warps": row_num_warps(block),
    }


def source(p: dict, nodes: list[str] | None = None) -> str:
    return codegen.render(TEMPLATE, p, nodes=nodes)
