"""Torch reference implementation of every IR op.

These functions are the oracle the Triton kernels are tested against and the CPU execution
path of the runtime. Each takes its tensor inputs positionally and its attributes as keyword
arguments, exactly as a plan node records them. The set of names in `OPS` is the IR's closed
op set: the builder's verifier rejects any other op.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_engine.kernels import formats
from llm_engine.kernels import moe as moe_ref
from llm_engine.kernels.attention import paged_attention, sdpa
from llm_engine.kernels.dtypes import to_torch_dtype
from llm_engine.kernels.pointwise import eval_expr


@dataclass(frozen=True)
class OpDef:
    """One IR op: its reference function and the family it belongs to."""

    name: str
    fn: Callable
    kind: str  # source | elementwise | reduction | shape | gemm | norm | attention | fused
    #            | collective
    arity: tuple[int, int]  # min and max number of tensor inputs
    needs_ctx: bool = False  # reads runtime state (the KV cache) passed as `ctx=`


def _scalar_binary(fn: Callable) -> Callable:
    """Binary ops accept either two tensors or one tensor and `scalar` (on the right unless
    `scalar_first`), because the traced graphs mix both forms."""

    def op(a, b=None, *, scalar=None, scalar_first=False):
        if b is None:
            return fn(scalar, a) if scalar_first else fn(a, scalar)
        return fn(a, b)

    return op


def _sub(a, b):
    return torch.sub(torch.as_tensor(a), b) if not torch.is_tensor(a) else torch.sub(a, b)


def _div(a, b):
    return torch.div(torch.as_tensor(a), b) if not torch.is_tensor(a) else torch.div(a, b)


def _pow(a, b):
    return torch.pow(a, b)


def to_dtype(x, *, dtype):
    return x.to(to_torch_dtype(dtype))


def gelu(x, *, approximate="none"):
    return F.gelu(x, approximate=approximate)


def mean(x, *, dims, keepdim=False):
    return x.mean(dim=dims, keepdim=keepdim)


def sum_(x, *, dims, keepdim=False):
    return x.sum(dim=dims, keepdim=keepdim)


def amax(x, *, dims, keepdim=False):
    return x.amax(dim=dims, keepdim=keepdim)


def softmax(x, *, dim, dtype=None):
    return torch.softmax(x, dim=dim, dtype=to_torch_dtype(dtype) if dtype else None)


def reshape(x, *, shape):
    return x.reshape(shape)


def transpose(x, *, dim0, dim1):
    return x.transpose(dim0, dim1)


def permute(x, *, dims):
    return x.permute(dims)


def unsqueeze(x, *, dim):
    return x.unsqueeze(dim)


def squeeze(x, *, dim):
    return x.squeeze(dim)


def expand(x, *, shape):
    return x.expand(shape)


def slice_(x, *, dim, start, end, step=1):
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


def select(x, *, dim, index):
    return x.select(dim, index)


def cat(*xs, dim):
    return torch.cat(xs, dim=dim)


def pad(x, *, after):
    """Zeros appended to the last dimension (values of a smaller head size than keys, padded
    into a paged cache that holds one head size)."""
    return F.pad(x, (0, after))


def index_select(x, index, *, dim):
    return x.index_select(dim, index)


def getitem(x, *, index):
    return x[index]


def embedding(weight, ids, scale=None, *, b_format="dense", dtype=None, vocab_start=None,
              vocab_end=None):
    """Rows of the table for `ids`. With b_format="int8_channel" the table is int8 [V, D]
    with one fp32 scale per row (the layout a tied LM head shares): row = q[id] * scale[id],
    returned in `dtype` (the model's activation dtype).

    With `vocab_start`/`vocab_end` the table holds only that slice of the vocabulary (one
    tensor-parallel rank's share): ids outside it give zero rows, and an all-reduce over the
    ranks completes the lookup."""
    if vocab_start is not None:
        inside = (ids >= vocab_start) & (ids < vocab_end)
        local = torch.where(inside, ids - vocab_start, torch.zeros_like(ids))
        rows = embedding(weight, local, scale, b_format=b_format, dtype=dtype)
        return rows.masked_fill(~inside.unsqueeze(-1), 0)
    if b_format == "dense":
        return F.embedding(ids, weight)
    if b_format == "int8_channel":
        from llm_engine.kernels.quant import int8_embedding

        rows = int8_embedding(weight, scale, ids)
        return rows if dtype is None else rows.to(to_torch_dtype(dtype))
    raise ValueError(f"embedding: unknown b_format {b_format!r}")


def linear(x, w, *rest, b_format="dense", group_size=None):
    """x @ W^T (+ bias), W stored as `b_format` (`kernels.formats`, operands in order):

    - "dense":           w [N, K] in x's dtype
    - "int8_channel":    q int8 [N, K], scale fp32 [N]                  (weight-only)
    - "int4_group":      packed uint8 [N, K/2], scales fp32 [N, K/G], zeros fp32 [N, K/G];
                         attr group_size = G                             (weight-only)
    - "int8_channel_a8": q int8 [N, K], scale fp32 [N]; x quantized to int8 per token
                         (dynamic, symmetric) and multiplied in integers (SmoothQuant W8A8)
    - "fp8_channel_a8":  q float8_e4m3fn [N, K], scale fp32 [N], x_scale fp32 [1]; x
                         quantized to e4m3 with the static per-tensor x_scale (FP8 W8A8)
    - "fp8_channel_a8_token": q float8_e4m3fn [N, K], scale fp32 [N]; x quantized to e4m3
                         per token (dynamic scale amax|x_row| / 448)
    - "fp8_channel_a8_group": q float8_e4m3fn [N, K], scale fp32 [N]; attr group_size = G;
                         x quantized to e4m3 per token and group of G channels (dynamic)

    followed by the optional bias [N]."""
    try:
        fmt = formats.get(b_format)
    except ValueError as e:
        raise ValueError(f"linear: {e}") from None
    n = fmt.operands
    ops, bias = (w, *rest[: n - 1]), (rest[n - 1] if len(rest) >= n else None)
    return fmt.linear(x, *ops, group_size=group_size, bias=bias)


def all_reduce(x, *, ctx):
    """Sum over the tensor-parallel ranks (`ctx.comm`); the identity on a single rank."""
    comm = getattr(ctx, "comm", None)
    return x if comm is None else comm.all_reduce(x)


def all_gather(x, *, dim, size, ranks, ctx):
    """Concatenate the `ranks` ranks' `x` along `dim` (rank order) and keep the first `size`
    entries: vocabulary shards are padded to equal length, the padding is cut here."""
    comm = getattr(ctx, "comm", None)
    parts = [x] if comm is None else comm.all_gather(x)
    out = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
    return out.narrow(dim, 0, size) if out.shape[dim] != size else out


def matmul(a, b):
    return torch.matmul(a, b)


def rms_norm(x, w, *, eps):
    """RMSNorm computed in float32 and cast back, the way HF Llama/Qwen2/Mistral do it."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


def layer_norm(x, w, b=None, *, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def add_rms_norm(x, residual, w, *, eps):
    """Residual add fused with RMSNorm: returns (normed, updated residual)."""
    s = x + residual
    return rms_norm(s, w, eps=eps), s


def add_layer_norm(x, residual, w, b=None, *, eps):
    s = x + residual
    return layer_norm(s, w, b, eps=eps), s


def rope(x, cos, sin):
    """Rotary embedding, rotate-half convention: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


_ACTS: dict[str, Callable] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def moe(x, index, weights, *rest, act, alpha=0.0, limit=0.0, w_format="dense",
        group_size=None):
    """The experts of a mixture-of-experts block (kernels/moe.py): gate_up's then down's
    stored parts in `w_format` (`kernels.formats`: "dense", "int8_channel" or "int4_group",
    experts first), then the optional gate_up and down biases."""
    if act not in _ACTS and act != "clamped_swiglu":
        raise ValueError(f"moe: unknown activation {act!r}")
    fmt = formats.get(w_format)
    if fmt.activations:
        raise ValueError(f"moe: {w_format} quantizes activations; experts are weight-only")
    n = fmt.operands
    if len(rest) not in (2 * n, 2 * n + 2):
        raise ValueError(f"moe: {len(rest)} weight operands for format {w_format} "
                         f"(want {2 * n}, or {2 * n + 2} with biases)")
    biases = rest[2 * n:] or (None, None)

    def linear(h, *parts):
        return fmt.linear(h, *parts, group_size=group_size)

    return moe_ref.moe(x, index, weights, rest[:n], rest[n:2 * n], *biases, act=act,
                       acts=_ACTS, alpha=alpha, limit=limit,
                       linear=moe_ref.dense_linear if n == 1 else linear)


def gated_act(x, *, act):
    """act(gate) * up over the two halves of the last dimension (gate first)."""
    gate, up = x.chunk(2, dim=-1)
    return _ACTS[act](gate) * up


def pointwise(*xs, expr, dtype):
    return eval_expr(expr, xs, OPS).to(to_torch_dtype(dtype))


UNARY: dict[str, Callable] = {
    "neg": torch.neg,
    "rsqrt": torch.rsqrt,
    "sqrt": torch.sqrt,
    "exp": torch.exp,
    "log": torch.log,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "relu": F.relu,
    "cos": torch.cos,
    "sin": torch.sin,
    "abs": torch.abs,
    "reciprocal": torch.reciprocal,
    "erf": torch.erf,
    "floor": torch.floor,
    "log1p": torch.log1p,
}

BINARY: dict[str, Callable] = {
    "add": torch.add,
    "sub": _sub,
    "mul": torch.mul,
    "div": _div,
    "pow": _pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}


def _build() -> dict[str, OpDef]:
    ops: list[OpDef] = [
        OpDef("input", lambda: None, "source", (0, 0)),
        OpDef("weight", lambda: None, "source", (0, 0)),
        OpDef("to_dtype", to_dtype, "elementwise", (1, 1)),
        OpDef("gelu", gelu, "elementwise", (1, 1)),
        OpDef("mean", mean, "reduction", (1, 1)),
        OpDef("sum", sum_, "reduction", (1, 1)),
        OpDef("amax", amax, "reduction", (1, 1)),
        OpDef("softmax", softmax, "reduction", (1, 1)),
        OpDef("reshape", reshape, "shape", (1, 1)),
        OpDef("transpose", transpose, "shape", (1, 1)),
        OpDef("permute", permute, "shape", (1, 1)),
        OpDef("unsqueeze", unsqueeze, "shape", (1, 1)),
        OpDef("squeeze", squeeze, "shape", (1, 1)),
        OpDef("expand", expand, "shape", (1, 1)),
        OpDef("slice", slice_, "shape", (1, 1)),
        OpDef("select", select, "shape", (1, 1)),
        OpDef("getitem", getitem, "shape", (1, 1)),
        OpDef("cat", cat, "copy", (1, 64)),
        OpDef("index_select", index_select, "copy", (2, 2)),
        OpDef("pad", pad, "copy", (1, 1)),
        OpDef("embedding", embedding, "gemm", (2, 3)),
        OpDef("linear", linear, "gemm", (2, 5)),
        OpDef("matmul", matmul, "gemm", (2, 2)),
        OpDef("rms_norm", rms_norm, "norm", (2, 2)),
        OpDef("layer_norm", layer_norm, "norm", (2, 3)),
        OpDef("add_rms_norm", add_rms_norm, "norm", (3, 3)),
        OpDef("add_layer_norm", add_layer_norm, "norm", (3, 4)),
        OpDef("rope", rope, "fused", (3, 3)),
        OpDef("gated_act", gated_act, "fused", (1, 1)),
        OpDef("pointwise", pointwise, "fused", (1, 16)),
        OpDef("topk", moe_ref.topk, "reduction", (1, 1)),
        OpDef("gather", moe_ref.gather, "copy", (2, 2)),
        OpDef("scatter", moe_ref.scatter, "copy", (2, 2)),
        OpDef("masked_fill", moe_ref.masked_fill, "copy", (2, 2)),
        OpDef("logical_not", moe_ref.logical_not, "copy", (1, 1)),
        OpDef("compare", moe_ref.compare, "copy", (1, 2)),
        OpDef("moe", moe, "fused", (5, 11)),
        OpDef("sdpa", sdpa, "attention", (3, 4)),
        OpDef("paged_attention", paged_attention, "attention", (7, 9), needs_ctx=True),
        OpDef("all_reduce", all_reduce, "collective", (1, 1), needs_ctx=True),
        OpDef("all_gather", all_gather, "collective", (1, 1), needs_ctx=True),
    ]
    ops += [OpDef(name, fn, "elementwise", (1, 1)) for name, fn in UNARY.items()]
    ops += [OpDef(name, _scalar_binary(fn), "elementwise", (1, 2)) for name, fn in BINARY.items()]
    return {op.name: op for op in ops}


OPS: dict[str, OpDef] = _build()

# Ops whose output can be a view of their first input: the memory planner gives them no
# buffer of their own, and extends the lifetime of the tensor they view.
VIEW_OPS = frozenset({"reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand",
                      "slice", "select", "getitem"})
MULTI_OUTPUT_OPS = frozenset({"add_rms_norm", "add_layer_norm"})


def num_elements(shape) -> int:
    return math.prod(shape)
