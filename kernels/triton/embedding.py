"""Embedding lookup: one row of the weight table per token id.

Each program copies BLOCK columns of one token's row; the table's shape is baked into the
kernel. Ids outside [0, vocab) read as zero rows (the reference raises instead: a kernel cannot,
and the tokenizer never produces them).

Node attribute `"b_format"` (the table's storage, as in `kernels.ops.embedding`):

* absent: a dense float table, `launch(weight, ids)` -> rows in the table's dtype.
* "int8_channel": an int8 table [V, D] with one float32 scale per row (the layout a tied LM
  head shares), `launch(q, ids, scale, **attrs)` -> rows q[id] * scale[id], computed in float32
  (`kernels.quant.int8_embedding`) and rounded once to the node attribute `"dtype"` (a float
  dtype name) if it has one, else left float32, as `kernels.ops.embedding` does. Params add
  `b_format` and `out_dtype`, and `dtype` is "int8".
"""

from __future__ import annotations

from llm_engine.kernels import codegen
from llm_engine.kernels.triton import next_pow2, row_num_warps

TEMPLATE = "embedding"

WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
ID_DTYPES = ("int64", "int32")
MAX_BLOCK = 1024  # columns per program; wider rows use a second grid dimension



def _is_size(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 1


def params(op: str, attrs: dict, in_shapes: list[tuple], in_dtypes: list[str],
           out_dtype: str | list[str]) -> dict | None:
    """Template parameters for an embedding node, or None where this family cannot run it."""
    if op != "embedding" or set(attrs) - {"b_format", "dtype"}:
        return None
    b_format = attrs.get("b_format")
    if b_format is None and not attrs and len(in_shapes) == len(in_dtypes) == 2:
        w_dtype, id_dtype = in_dtypes
        if w_dtype not in WEIGHT_DTYPES or out_dtype != w_dtype:
            return None
    elif b_format == "int8_channel" and len(in_shapes) == len(in_dtypes) == 3:
        w_dtype, id_dtype, scale_dtype = in_dtypes
        if w_dtype != "int8" or scale_dtype != "float32" or \
                out_dtype not in WEIGHT_DTYPES or out_dtype != attrs.get("dtype", "float32"):
            return None
    else:
        return None
    w_shape = tuple(in_shapes[0])
    if id_dtype not in ID_DTYPES or len(w_shape) != 2 or not all(_is_size(d) for d in w_shape):
        return None
    vocab, dim = w_shape
    if b_format is not None and tuple(in_shapes[2]) != (vocab,):
        return None
    block = min(next_pow2(dim), MAX_BLOCK)
    p = {
        "op": op,
        "dtype": w_dtype,
        "id_dtype": id_dtype,
        "vocab": vocab,
        "dim": dim,
        "BLOCK": block,
        "num_warps": row_num_warps(block),
    }
    if b_format is not None:
        p.update(b_format=b_format, out_dtype=out_dtype)
    return p


def source(p: dict, nodes: list[str] | None = None) -> str:
    return codegen.render(TEMPLATE, p, nodes=nodes)
