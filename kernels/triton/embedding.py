"""Embedding lookup: one row of the weight table per token id.

Each program copies BLOCK columns of one token's row; the table's shape is baked into the
kernel. Ids outside [0, vocab) read as zero rows (the reference raises instead: a kernel cannot,
and the tokenizer never produces them).
"""

from __future__ import annotations

from kernels import codegen
from kernels.triton import next_pow2, row_num_warps

TEMPLATE = "embedding"

WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
ID_DTYPES = ("int64", "int32")
MAX_BLOCK = 1024  # columns per program; wider rows use a second grid dimension



def _is_size(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 1


def params(op: str, attrs: dict, in_shapes: list[tuple], in_dtypes: list[str],
           out_dtype: str | list[str]) -> dict | None:
    """Template parameters for an embedding node, or None where this family cannot run it."""
    if op != "embedding" or attrs or len(in_shapes) != 2 or len(in_dtypes) != 2:
        return None
    w_dtype, id_dtype = in_dtypes
    if w_dtype not in WEIGHT_DTYPES or id_dtype not in ID_DTYPES or out_dtype != w_dtype:
        return None
    w_shape = tuple(in_shapes[0])
    if len(w_shape) != 2 or not all(_is_size(d) for d in w_shape):
        return None
    vocab, dim = w_shape
    block = min(next_pow2(dim), MAX_BLOCK)
    return {
        "op": op,
        "dtype": w_dtype,
        "id_dtype": id_dtype,
        "vocab": vocab,
        "dim": dim,
        "BLOCK": block,
        "num_warps": row_num_warps(block),
    }


def source(p: dict, nodes: list[str] | None = None) -> str:
    return codegen.render(TEMPLATE, p, nodes=nodes)
