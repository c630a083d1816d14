"""Evaluation of the small expression trees that fused pointwise nodes carry.

A tree is nested dicts: `{"in": i}` is the i-th input tensor, `{"const": c}` a scalar, and
`{"op": name, "args": [...], **attrs}` applies an elementwise IR op. The Triton template for
`pointwise` emits the same tree inline; this is its reference. The ops are looked up in the
op table the caller passes (`kernels.ops.OPS`, which itself uses this module for `pointwise`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def eval_expr(expr: dict, inputs: Sequence[torch.Tensor], ops: Mapping[str, Any]):
    if "in" in expr:
        return inputs[expr["in"]]
    if "const" in expr:
        return expr["const"]
    return apply_node(expr, [eval_expr(a, inputs, ops) for a in expr["args"]], ops)


def apply_node(expr: dict, args: list, ops: Mapping[str, Any]):
    """Run one op node of an expression tree on its evaluated arguments (tensors, or a
    scalar constant as one operand of a binary op); `ops`: name -> OpDef."""
    attrs = {k: v for k, v in expr.items() if k not in ("op", "args")}
    tensors = [a for a in args if torch.is_tensor(a)]
    if len(tensors) < len(args):  # binary op with a scalar operand
        scalar = next(a for a in args if not torch.is_tensor(a))
        attrs.update(scalar=scalar, scalar_first=not torch.is_tensor(args[0]))
    return ops[expr["op"]].fn(*tensors, **attrs)


def expr_inputs(expr: dict) -> set[int]:
    if "in" in expr:
        return {expr["in"]}
    return set().union(*(expr_inputs(a) for a in expr.get("args", [])))


def expr_to_str(expr: dict) -> str:
    """Readable form for reports and kernel headers, e.g. `mul(in0, tanh(in1))`."""
    if "in" in expr:
        return f"in{expr['in']}"
    if "const" in expr:
        return repr(expr["const"])
    return f"{expr['op']}({', '.join(expr_to_str(a) for a in expr['args'])})"
