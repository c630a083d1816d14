"""Row normalisation kernels: rms_norm, layer_norm and their residual-add fusions.

One program normalises one row held whole in registers (BLOCK = next power of two of the
hidden size), so the hidden size is baked into the kernel. Rounding follows the references in
`kernels/ops.py` step by step: the residual sum is rounded to its dtype before it is
normalised, and rms_norm rounds the normalised value to the input dtype before scaling by `w`.
"""

from __future__ import annotations

import torch

from llm_engine.kernels import codegen
from llm_engine.kernels.triton import next_pow2

TEMPLATE = "norm"

OPS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
MAX_BLOCK = 65536  # a row larger than this does not fit one program's registers


def _promote(a: str, b: str) -> str:
    return str(torch.promote_types(getattr(torch, a), getattr(torch, b))).removeprefix("torch.")



def _num_warps(block: int) -> int:
    return 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32


def params(op: str, attrs: dict, in_shapes: list[tuple], in_dtypes: list[str],
           out_dtype: str | list[str]) -> dict | None:
    """Template parameters for a norm node, or None where this family cannot run it."""
    if op not in OPS or set(attrs) != {"eps"} or isinstance(attrs["eps"], bool) \
            or not isinstance(attrs["eps"], int | float):
        return None
    has_residual = op.startswith("add_")
    kind = "rms" if op.endswith("rms_norm") else "layer"
    n_fixed = 3 if has_residual else 2  # x[, residual], w
    max_inputs = n_fixed + (kind == "layer")  # layer norm takes an optional bias
    if not n_fixed <= len(in_shapes) <= max_inputs or len(in_dtypes) != len(in_shapes):
        return None
    if any(d not in FLOAT_DTYPES for d in in_dtypes):
        return None
    shapes = [tuple(s) for s in in_shapes]
    x_shape = shapes[0]
    if not x_shape or not isinstance(x_shape[-1], int) or isinstance(x_shape[-1], bool) \
            or x_shape[-1] < 1:
        return None
    hidden = x_shape[-1]
    if has_residual and shapes[1] != x_shape:
        return None
    if any(s != (hidden,) for s in shapes[n_fixed - 1:]):  # w (and b) are hidden-vectors
        return None
    block = next_pow2(hidden)
    if block > MAX_BLOCK:
        return None

    x_dtype = in_dtypes[0]
    residual_dtype = in_dtypes[1] if has_residual else None
    w_dtype = in_dtypes[n_fixed - 1]
    b_dtype = in_dtypes[n_fixed] if len(in_dtypes) > n_fixed else None
    # the tensor that is normalised: x, or the residual sum x + residual in its promoted dtype
    norm_dtype = _promote(x_dtype, residual_dtype) if has_residual else x_dtype
    if kind == "rms":
        y_dtype = _promote(w_dtype, norm_dtype)  # w * y.to(x.dtype)
    else:
        # F.layer_norm: parameters of the input's dtype, or float32 ones for a 16-bit input
        if w_dtype not in (norm_dtype, "float32") or b_dtype not in (None, w_dtype):
            return None
        y_dtype = norm_dtype
    want = [y_dtype, norm_dtype] if has_residual else y_dtype
    got = list(out_dtype) if isinstance(out_dtype, list | tuple) else out_dtype
    if got != want:
        return None
    return {
        "op": op,
        "kind": kind,
        "has_residual": has_residual,
        "has_bias": b_dtype is not None,
        "eps": float(attrs["eps"]),
        "hidden": hidden,
        "x_dtype": x_dtype,
        "residual_dtype": residual_dtype,
        "w_dtype": w_dtype,
        "b_dtype": b_dtype,
        "norm_dtype": norm_dtype,
        "out_dtype": y_dtype,
        "BLOCK": block,
        "num_warps": _num_warps(block),
    }


def source(p: dict, nodes: list[str] | None = None) -> str:
    return codegen.render(TEMPLATE, p, nodes=nodes)
