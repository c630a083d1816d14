"""Fused elementwise kernels: a `pointwise` node's expression tree, or one elementwise IR op
(unary, binary, to_dtype, gelu) taken as a one-node tree, becomes one kernel.

The template emits the tree inline as one Triton expression, evaluated in float32 per output
element and cast once to the output dtype; explicit `to_dtype` casts to 16-bit floats inside
the tree round as the reference rounds. Unlike the reference, implicit per-op rounding of 16-bit
intermediates is not reproduced (the kernel is the more precise of the two).

Inputs broadcast to the output shape. params() classifies each input from the node's (possibly
symbolic) shapes, so the kernel reads it in the cheapest way that is right for every T:

- "full":    same elements as the output, read contiguously at the output offset;
- "scalar":  one element, loaded once;
- "inner":   repeats over leading dims (a weight vector [D], a [H, D] table): offset % size;
- "outer":   repeats over trailing dims (a per-row statistic [T, 1]): offset // size;
- "strided": any other broadcast, indexed through the output's multi-index and the input's
             expanded strides, passed at launch.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_engine.kernels import codegen, ops
from llm_engine.kernels.dtypes import to_torch_dtype
from llm_engine.kernels.pointwise import apply_node, expr_inputs
from llm_engine.kernels.triton import static_numel

TEMPLATE = "pointwise"

UNARY = frozenset(ops.UNARY)
BINARY = frozenset(ops.BINARY)
SINGLE_OPS = UNARY | BINARY | {"to_dtype", "gelu"}  # elementwise IR ops taken as one-node trees
COMPUTE_DTYPES = frozenset({"float32", "float16", "bfloat16"})  # computed in float32 exactly
LOAD_DTYPES = COMPUTE_DTYPES | {"int64", "int32", "int16", "int8", "uint8", "bool"}
BLOCK = 1024
NUM_WARPS = 4


class _Unsupported(Exception):
    pass


def _is_number(c: Any) -> bool:
    return isinstance(c, int | float)  # bool is an int: True/False constants are fine


def _check_tree(e: Any, n_inputs: int) -> None:
    """Structure: every node an input, a number or a known op with the right arity/attrs."""
    if not isinstance(e, dict):
        raise _Unsupported(f"not a tree node: {e!r}")
    if "in" in e:
        if set(e) != {"in"} or not isinstance(e["in"], int) or not 0 <= e["in"] < n_inputs:
            raise _Unsupported(f"bad input reference {e!r}")
        return
    if "const" in e:
        if set(e) != {"const"} or not _is_number(e["const"]):
            raise _Unsupported(f"bad constant {e!r}")
        return
    op, args = e.get("op"), e.get("args")
    attrs = {k: v for k, v in e.items() if k not in ("op", "args")}
    if not isinstance(args, list):
        raise _Unsupported(f"bad node {e!r}")
    if op in UNARY:
        ok = len(args) == 1 and not attrs
    elif op in BINARY:
        ok = len(args) == 2 and not attrs
    elif op == "to_dtype":
        ok = len(args) == 1 and set(attrs) == {"dtype"}
    elif op == "gelu":
        ok = len(args) == 1 and set(attrs) <= {"approximate"} \
            and attrs.get("approximate", "none") in ("none", "tanh")
    else:
        raise _Unsupported(f"op {op!r} is not elementwise")
    if not ok:
        raise _Unsupported(f"bad arguments or attributes for {op}: {e!r}")
    if all("const" in a for a in args if isinstance(a, dict)):
        raise _Unsupported(f"{op} of constants only")
    for a in args:
        _check_tree(a, n_inputs)


def _infer(e: dict, dummies: list[torch.Tensor]):
    """Evaluate the tree as `kernels.pointwise.eval_expr` does, on one-element stand-ins, and
    check that every op computes in a float dtype the kernel's float32 math reproduces."""
    if "in" in e:
        return dummies[e["in"]]
    if "const" in e:
        return e["const"]
    args = [_infer(a, dummies) for a in e["args"]]
    try:
        out = apply_node(e, args, ops.OPS)
    except (RuntimeError, TypeError, ValueError) as err:
        raise _Unsupported(f"{e['op']}: {err}") from None
    name = str(out.dtype).removeprefix("torch.")
    if name not in COMPUTE_DTYPES:
        raise _Unsupported(f"{e['op']} computes in {name}")
    return out


def _single_op_tree(op: str, attrs: dict, n_inputs: int) -> dict | None:
    """The one-node tree of a lone elementwise op, as the fuse pass would write it."""
    attrs = dict(attrs)
    scalar = attrs.pop("scalar", None)
    scalar_first = attrs.pop("scalar_first", False)
    if op in BINARY and scalar is not None:
        if n_inputs != 1:
            return None
        args = [{"const": scalar}, {"in": 0}] if scalar_first else [{"in": 0}, {"const": scalar}]
    elif scalar_first:
        return None
    else:
        args = [{"in": i} for i in range(n_inputs)]
    return {"op": op, "args": args, **attrs}


def _broadcast(shapes: list[tuple]) -> tuple[tuple, list[tuple]] | None:
    """Output shape and the inputs' shapes left-padded to its rank; dims are ints or symbols."""
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    out = []
    for dims in zip(*padded):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out), padded



def _layout(p: tuple, out: tuple) -> dict:
    if p == out:
        return {"kind": "full"}
    if all(d == 1 for d in p):
        return {"kind": "scalar"}
    rank = len(out)
    for k in range(1, rank):
        # the input is the output's trailing k dims, repeated over the leading ones
        if p[rank - k:] == out[rank - k:] and all(d == 1 for d in p[:rank - k]):
            size = static_numel(out[rank - k:])
            if size is not None:
                return {"kind": "inner", "size": size}
            break
    for k in range(1, rank):
        # the input is the output's leading dims, each element repeated over the trailing k
        if p[:rank - k] == out[:rank - k] and all(d == 1 for d in p[rank - k:]):
            size = static_numel(out[rank - k:])
            if size is not None and size > 1:
                return {"kind": "outer", "size": size}
            break
    return {"kind": "strided"}


def params(op: str, attrs: dict, in_shapes: list[tuple], in_dtypes: list[str],
           out_dtype: str | list[str]) -> dict | None:
    """Template parameters for a pointwise node or a lone elementwise op, or None where this
    family cannot run it (integer or float64 arithmetic, unknown ops, shapes that do not
    broadcast)."""
    n = len(in_shapes)
    if not isinstance(out_dtype, str) or out_dtype not in COMPUTE_DTYPES:
        return None
    if n == 0 or len(in_dtypes) != n or any(d not in LOAD_DTYPES for d in in_dtypes):
        return None
    if op == "pointwise":
        if set(attrs) != {"expr", "dtype"} or attrs["dtype"] != out_dtype:
            return None
        tree = attrs["expr"]
    elif op in SINGLE_OPS:
        tree = _single_op_tree(op, attrs, n)
        if tree is None:
            return None
    else:
        return None
    try:
        _check_tree(tree, n)
        if expr_inputs(tree) != set(range(n)):
            return None
        dummies = [torch.ones(1, dtype=to_torch_dtype(d)) for d in in_dtypes]
        result = _infer(tree, dummies)
    except _Unsupported:
        return None
    if op != "pointwise" and result.dtype != to_torch_dtype(out_dtype):
        return None  # a lone op's output dtype is its torch result dtype
    shapes = _broadcast([tuple(s) for s in in_shapes])
    if shapes is None:
        return None
    out_shape, padded = shapes
    p = {
        "op": op,
        "attrs": attrs,
        "dtype": out_dtype,
        "in_dtypes": list(in_dtypes),
        "inputs": [_layout(s, out_shape) for s in padded],
        "rank": len(out_shape),
        "BLOCK": BLOCK,
        "num_warps": NUM_WARPS,
    }
    if op != "pointwise":
        p["expr"] = tree
    return p


def source(p: dict, nodes: list[str] | None = None) -> str:
    return codegen.render(TEMPLATE, p, nodes=nodes)
