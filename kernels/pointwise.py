"""Evaluation of the small expression trees that fused pointwise nodes carry.

A tree is nested dicts: `{"in": i}` is the i-th input tensor, `{"const": c}` a scalar, and
`{"op": name, "args": [...], **attrs}` applies an elementwise IR op. The Triton template for
`pointwise` emits the same tree inline; this is its reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def eval_expr(expr: dict, inputs: Sequence[torch.Tensor]):
    if "in" in expr:
        return inputs[expr["in"]]
    if "const" in expr:
        return expr["const"]
    return apply_node(expr, [eval_expr(a, inputs) for a in expr["args"]])


def apply_node(expr: dict, args: list):
    """Run one op node of an expression tree on its evaluated arguments (tensors, or a
    scalar constant as one operand of a binary op)."""
    from llm_engine.kernels.ops import OPS  # the op table imports this module

    attrs = {k: v for k, v in expr.items() if k not in ("op", "args")}
    tensors = [a for a in args if torch.is_tensor(a)]
    if len(tensors) < len(args):  # binary op with a scalar operand
        scalar = next(a for a in args if not torch.is_tensor(a))
        attrs.update(scalar=scalar, scalar_first=not torch.is_tensor(args[0]))
    return OPS[expr["op"]].fn(*tensors, **attrs)


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
