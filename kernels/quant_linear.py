"""The quantized formats' linears in torch: x @ W^T (+ bias) for each weight format.

`int8_linear`, `int4_linear`, `int8_a8_linear`, `fp8_a8_linear`, `fp8_a8_token_linear` and
`fp8_a8_group_linear` are the torch reference that each format's `linear` in `kernels.formats`
calls (through `kernels.ops.linear`). They compute the products that `kernels.quant` defines,
on any device. On CPU each takes the path measured fastest for its row count. That is torch's
packed kernel (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`,
`torch._int_mm`) where it exists, has been verified and is enabled for that many rows;
otherwise the weight is dequantized a block of rows at a time for F.linear. These functions
only choose a path. The paths, the checks that must pass before a path runs, and the record of
the path each op took (`cpu_kernels.KERNELS.paths`, reported by `cpu_paths()`) are in
`kernels.cpu_kernels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_engine.kernels import cpu_kernels as ck
from llm_engine.kernels.quant import (
    int8_a8_linear_reference,
    quantize_fp8_tensor,
    quantize_fp8_token,
    quantize_fp8_token_group,
    quantize_int8_token,
)


def _finish(y2: torch.Tensor, x: torch.Tensor, N: int) -> torch.Tensor:
    return y2.reshape(*x.shape[:-1], N)


# ---- int8 weight-only ------------------------------------------------------------------------


def _dequant_int8_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # dequantize_int8_channel's values, with one allocation (in place).
    return q.float().mul_(scale.float()[:, None]).to(dtype)


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype, W from (q int8 [N, K], scale fp32 [N]).

    Up to `KERNELS.max_rows["int8_linear"]` rows of float x on CPU: torch._weight_int8pack_mm
    if it was verified at first use; else the weight dequantized (fp32, then x's dtype; on CPU
    in blocks of rows) and F.linear. `KERNELS.paths["int8_linear"]` says which.
    """
    kernels = ck.KERNELS
    kernels.record("int8_linear")
    N = q.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if kernels.use_kernel("int8_linear", x2, N):
        y = ck.int8_kernel(x2, q, scale)
        return _finish(y if bias is None else y + bias.to(y.dtype), x, N)
    b = None if bias is None else bias.to(x.dtype)
    y = ck.rows_linear(x2, N, lambda i, j: _dequant_int8_rows(q[i:j], scale[i:j], x.dtype), b)
    return _finish(y, x, N)


# ---- int4 weight-only ------------------------------------------------------------------------


def _dequant_int4_rows(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    # dequantize_int4_group's values ((q - z) * s in fp32), in place after one allocation.
    N = packed.shape[0]
    q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(N, -1, group_size).float()
    w = q.sub_(zeros.float()[..., None]).mul_(scales.float()[..., None])
    return w.reshape(N, -1).to(dtype)


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype, W the int4 group weight
    (`kernels.quant`).

    Up to `KERNELS.max_rows["int4_linear"]` rows of float x on CPU, where torch's kernel takes
    the shape (`int4_kernel_supports`): torch._weight_int4pack_mm_for_cpu if it was verified at
    first use, with the weight converted to its layout once and cached (`_int4_pack`); else the
    weight dequantized (fp32, then x's dtype; on CPU in blocks of rows) and F.linear.
    `KERNELS.paths["int4_linear"]` says which.
    """
    kernels = ck.KERNELS
    kernels.record("int4_linear")
    N = packed.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if ck.int4_kernel_supports(N, group_size) and kernels.use_kernel("int4_linear", x2, N):
        y = ck.int4_kernel(x2, packed, scales, zeros, group_size)
        return _finish(y if bias is None else y + bias.to(y.dtype), x, N)
    b = None if bias is None else bias.to(x.dtype)

    def rows(i, j):
        return _dequant_int4_rows(packed[i:j], scales[i:j], zeros[i:j], group_size, x.dtype)

    return _finish(ck.rows_linear(x2, N, rows, b), x, N)


# ---- W8A8: activations quantized too ---------------------------------------------------------


def int8_a8_linear(x, q, scale, bias=None):
    """x [..., K] @ W^T with int8 activations per token and int8 weights per channel, the int8
    products accumulated exactly (`kernels.quant`: int8_channel_a8).

    On CPU, up to `KERNELS.max_rows["int8_a8_linear"]` rows: torch._int_mm (int32) if verified
    at first use; otherwise exact float32 dots (`int8_dot_exact`, verified at first use),
    scaled in float64 like the reference; elsewhere, and if neither verified, the float64
    reference. `KERNELS.paths["int8_a8_linear"]` says which."""
    kernels = ck.KERNELS
    kernels.record("int8_a8_linear")
    N = q.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if x.device.type != "cpu" or x2.shape[0] == 0:
        return int8_a8_linear_reference(x, q, scale, bias)
    if kernels.use_kernel("int8_a8_linear", x2, N):
        xq, a = quantize_int8_token(x2)
        acc = torch._int_mm(xq, q.t())
        y = (acc.float() * a[:, None] * scale[None, :]).to(x.dtype)
    elif kernels.check("int8_a8_exact"):
        xq, a = quantize_int8_token(x2)
        acc = ck.int8_dot_exact(xq, q)
        y = (acc * a.double()[:, None] * scale.double()[None, :]).to(x.dtype)
    else:
        return int8_a8_linear_reference(x, q, scale, bias)
    y = _finish(y, x, N)
    return y if bias is None else y + bias.to(y.dtype)


def _fp8_dot(xq: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """xq.float() @ q.float()^T for e4m3 xq [M, K] and q [N, K], float32 [M, N]. Every product
    is exact in float32; on CPU both operands are dequantized through `fp8_div256` (verified
    at first use) a block of weight rows at a time, and the 2**-16 that puts on each product is
    undone by an exact power-of-two multiply."""
    if xq.device.type == "cpu" and ck.KERNELS.check("fp8_bits"):
        acc = ck.rows_linear(ck.fp8_div256(xq), q.shape[0], lambda i, j: ck.fp8_div256(q[i:j]))
        return acc * 65536.0
    return F.linear(xq.float(), q.float())


def fp8_a8_linear(x, q, scale, x_scale, bias=None):
    """The definition of fp8_channel_a8 (`kernels.quant`): fp8 activations (static scale) times
    fp8 weights, accumulated in fp32. Dequantizing both operands is exact (every e4m3 value is
    an fp32), so F.linear on them is the reference up to summation order; on CPU `_fp8_dot`
    dequantizes them faster, exactly. (torch._scaled_mm also runs on CPU, but measured 3-22x
    slower than this at SmolLM2's shapes, M = 1 and 64; see `cpu_kernels.KERNEL_MAX_ROWS`.)"""
    ck.KERNELS.record("fp8_a8_linear")
    N = q.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    c = x_scale.float() * scale.float()
    y = _fp8_dot(quantize_fp8_tensor(x2, x_scale), q) * c[None, :]
    y = _finish(y.to(x.dtype), x, N)
    return y if bias is None else y + bias.to(y.dtype)


def fp8_a8_token_linear(x, q, scale, bias=None):
    """The definition of fp8_channel_a8_token (`kernels.quant`): fp8 activations with one
    dynamic scale per token times fp8 weights, accumulated in fp32 (`_fp8_dot`, as
    fp8_a8_linear)."""
    ck.KERNELS.record("fp8_a8_token_linear")
    N = q.shape[0]
    xq, a = quantize_fp8_token(x.reshape(-1, x.shape[-1]))
    y = _fp8_dot(xq, q) * a[:, None] * scale.float()[None, :]
    y = _finish(y.to(x.dtype), x, N)
    return y if bias is None else y + bias.to(y.dtype)


def fp8_a8_group_linear(x, q, scale, group_size, bias=None):
    """The definition of fp8_channel_a8_group (`kernels.quant`): fp8 activations with one
    dynamic scale per token and group of `group_size` channels times fp8 weights, in fp32. The
    scales vary along K, so they are applied to the activations before the dot: xq * a is
    rounded to fp32 once per element (2**-24 relative), where the kernel scales each group's
    exact dot."""
    kernels = ck.KERNELS
    kernels.record("fp8_a8_group_linear")
    N, K = q.shape
    xq, a = quantize_fp8_token_group(x.reshape(-1, K), group_size)
    if x.device.type == "cpu" and kernels.check("fp8_bits"):
        xd = ck.fp8_div256(xq).reshape(-1, K // group_size, group_size) * (a * 256.0)[..., None]
        y = ck.rows_linear(xd.reshape(-1, K), N, lambda i, j: ck.fp8_div256(q[i:j])) * 256.0
    else:
        xd = xq.float().reshape(-1, K // group_size, group_size) * a[..., None]
        y = F.linear(xd.reshape(-1, K), q.float())
    y = _finish((y * scale.float()[None, :]).to(x.dtype), x, N)
    return y if bias is None else y + bias.to(y.dtype)
