"""Weight quantization: storage formats, torch references and CPU compute paths.

Pure torch (no builder imports), so the runtime can use it. Every weight is in torch's linear
layout, w [N, K] (N output channels, K input features), and every format dequantizes to that
[N, K] matrix. Formats:

* int8 per channel ("int8_channel", the `b_format` of `kernels/triton/gemm.py`):
  q int8 [N, K], scale float32 [N]; W = q.float() * scale[:, None]. Symmetric, q in -127..127.
* int4 per group: packed uint8 [N, K // 2], scales float32 [N, K // G], zeros uint8 [N, K // G]
  (G = group size, dividing K); W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G] with
  q in 0..15. Two nibbles per byte: byte j of a row holds column 2j in its LOW nibble and
  column 2j + 1 in its HIGH nibble.
* fp8 per channel: q float8_e4m3fn [N, K], scale float32 [N]; W = q.float() * scale[:, None].

Two formats also quantize the activations (W8A8), computing the product in low precision:

* int8_channel_a8: the int8 per-channel weight; x is quantized per token (row), dynamically:
  a = amax|x_row| / 127, xq = round(x / a) in -127..127; y = (xq @ q^T) * a[:, None] * scale.
* fp8_channel_a8: the fp8 per-channel weight; x is quantized with one static fp32 scale
  x_scale (from calibration): xq = e4m3(clamp(x / x_scale, ±448));
  y = (xq.float() @ q.float()^T) * x_scale * scale.

`int8_linear` / `int4_linear` compute x @ W^T (+ bias) on CPU with torch's packed-weight kernels
where they exist and agree with the reference (checked once, on a tiny case, at first use), and
by dequantize + F.linear otherwise. `PATHS` records which path each one uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT4_MAX = 15
INT8_MAX = 127
FP8_E4M3_MAX = 448.0

# op name -> the compute path it takes ("torch._weight_int8pack_mm", "dequantize+linear", ...);
# filled on first use (or by `cpu_paths()`), so importing this module runs no kernel.
PATHS: dict[str, str] = {}

# torch's CPU int4 kernel only takes these group sizes and N a multiple of 16
# (`_weight_int4pack_mm_cpu` / `_convert_weight_to_int4pack_cpu` checks in torch 2.13).
_INT4PACK_GROUPS = (32, 64, 128, 256)
_INT4PACK_N_MULTIPLE = 16
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# linear b_format -> number of weight operands (bias, if any, follows them); see kernels.ops.
FORMAT_OPERANDS = {"dense": 1, "int8_channel": 2, "int4_group": 3, "int8_channel_a8": 2,
                   "fp8_channel_a8": 3}


def _check_2d(w: torch.Tensor, name: str = "w") -> None:
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {tuple(w.shape)}")


# ---------------------------------------------------------------------------------------------
# int8, symmetric per output channel
# ---------------------------------------------------------------------------------------------


def quantize_int8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scale float32 [N]), W ≈ q.float() * scale[:, None].

    Symmetric per row: scale = amax(|w[n]|) / 127, q = round(w / scale) in -127..127 (-128 is
    never used, so the range is symmetric). An all-zero row gets scale 1 and q 0 (no 0/0).
    """
    _check_2d(w)
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(wf / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8_channel(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(q int8 [N, K], scale float32 [N]) -> W [N, K] in `dtype` (computed in fp32, rounded once)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


# ---------------------------------------------------------------------------------------------
# int4, asymmetric per group with integer zero points
# ---------------------------------------------------------------------------------------------


def resolve_group_size(K: int, requested: int) -> int:
    """The int4 group size to use for K input features when `requested` was asked for.

    `requested` if it divides K; else the largest divisor of K that is <= requested and a
    multiple of 8; else the largest divisor of K in 8..requested; else ValueError.
    """
    if K <= 0 or requested <= 0:
        raise ValueError(f"int4 group size: K={K} and requested group size {requested} must be > 0")
    if K % requested == 0:
        return requested
    divisors = [d for d in range(min(K, requested), 0, -1) if K % d == 0]
    for ok in (lambda d: d % 8 == 0, lambda d: d >= 8):
        for d in divisors:
            if ok(d):
                return d
    raise ValueError(
        f"int4 group size: K={K} has no divisor >= 8 that is <= the requested group size {requested}"
    )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [..., K] integers in 0..15 -> uint8 [..., K // 2].

    Byte j holds column 2j in its low nibble and column 2j + 1 in its high nibble.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dim must be even, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 [..., K] in 0..15 (inverse of `pack_int4`)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def quantize_int4_group(
    w: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (packed uint8 [N, K // 2], scales float32 [N, K // G], zeros uint8 [N, K // G]).

    Asymmetric per group of G consecutive columns: the group's range is widened to include 0
    (so zero is exact and the integer zero point stays in 0..15), scale = (max - min) / 15,
    zero = round(-min / scale), q = clamp(round(w / scale) + zero, 0, 15). Every element is
    then within scale / 2 of its dequantized value. A group of zeros gets scale 1, zero 0.
    G must divide K (see `resolve_group_size`) and K must be even (two nibbles per byte).
    """
    _check_2d(w)
    N, K = w.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(
            f"int4 group size {group_size} does not divide K={K}; use resolve_group_size(K, {group_size})"
        )
    if K % 2:
        raise ValueError(f"int4 packing needs an even K, got K={K}")
    g = w.float().reshape(N, K // group_size, group_size)
    lo = g.amin(dim=2).clamp(max=0.0)
    hi = g.amax(dim=2).clamp(min=0.0)
    span = hi - lo
    scales = torch.where(span > 0, span / INT4_MAX, torch.ones_like(span))
    zeros = torch.round(-lo / scales).clamp_(0, INT4_MAX)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp_(0, INT4_MAX)
    return pack_int4(q.reshape(N, K)), scales, zeros.to(torch.uint8)


def dequantize_int4_group(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(packed uint8 [N, K // 2], scales fp32 [N, K // G], zeros [N, K // G]) -> W [N, K] in `dtype`."""
    q = unpack_int4(packed).float()
    N, K = q.shape
    g = q.reshape(N, K // group_size, group_size)
    w = (g - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(N, K).to(dtype)


# ---------------------------------------------------------------------------------------------
# fp8 (e4m3fn), per output channel
# ---------------------------------------------------------------------------------------------


def _fp8_dtype() -> torch.dtype:
    if not hasattr(torch, "float8_e4m3fn"):
        raise RuntimeError(
            f"fp8 quantization needs torch.float8_e4m3fn, which torch {torch.__version__} lacks"
        )
    return torch.float8_e4m3fn


def quantize_fp8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q float8_e4m3fn [N, K], scale float32 [N]), W ≈ q.float() * scale[:, None].

    scale = amax(|w[n]|) / 448 (e4m3fn's largest finite value), so each row uses the full range;
    values are clamped to ±448 first because the cast does not saturate (e4m3fn has no inf).
    An all-zero row gets scale 1. Raises RuntimeError if torch has no float8_e4m3fn.
    """
    fp8 = _fp8_dtype()
    _check_2d(w)
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    q = (wf / scale[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(fp8)
    return q, scale


def dequantize_fp8_channel(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(q float8_e4m3fn [N, K], scale float32 [N]) -> W [N, K] in `dtype`."""
    return (q.float() * scale.float()[:, None]).to(dtype)


# ---------------------------------------------------------------------------------------------
# CPU compute paths
# ---------------------------------------------------------------------------------------------


def _reference_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # The probes run in fp32, where a correct kernel differs only by summation order.
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def _int8_kernel(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The kernel wants the scales in the activation dtype.
    return torch._weight_int8pack_mm(x2, q, scale.to(x2.dtype))


def _probe_int8() -> str:
    if "int8_linear" not in PATHS:
        path = "dequantize+linear"
        if hasattr(torch, "_weight_int8pack_mm"):
            try:
                gen = torch.Generator().manual_seed(0)
                w = torch.randn(5, 24, generator=gen)
                x = torch.randn(3, 24, generator=gen)
                q, s = quantize_int8_channel(w)
                ref = F.linear(x, dequantize_int8_channel(q, s))
                if _close(_int8_kernel(x, q, s), ref):
                    path = "torch._weight_int8pack_mm"
            except RuntimeError:
                pass
        PATHS["int8_linear"] = path
    return PATHS["int8_linear"]


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype, W from (q int8 [N, K], scale fp32 [N]).

    Uses torch._weight_int8pack_mm on CPU float inputs when it was verified at first use
    (`PATHS["int8_linear"]`), else dequantizes (fp32, then x's dtype) and calls F.linear.
    """
    use_kernel = (
        x.device.type == "cpu"
        and x.dtype in _FLOATS
        and x.numel() > 0
        and _probe_int8() == "torch._weight_int8pack_mm"
    )
    if not use_kernel:
        return _reference_linear(x, dequantize_int8_channel(q, scale), bias)
    y = _int8_kernel(x.reshape(-1, x.shape[-1]), q, scale).reshape(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


def _int4_kernel(
    x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    # torch's CPU int4 kernel computes W = (q - 8) * s + zf with a float zero zf per group, and
    # takes the unpacked q as int32 [N, K] (it repacks into its own tiled layout). Ours is
    # W = (q - z) * s, so zf = (8 - z) * s. Scales and zeros go as [K // G, N, 2] in x's dtype.
    q = unpack_int4(packed).to(torch.int32)
    w_packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    s = scales.float()
    zf = (8.0 - zeros.float()) * s
    sz = torch.stack((s.t(), zf.t()), dim=-1).contiguous().to(x2.dtype)
    return torch._weight_int4pack_mm_for_cpu(x2, w_packed, group_size, sz)


def _probe_int4() -> str:
    if "int4_linear" not in PATHS:
        path = "dequantize+linear"
        if hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
            torch, "_convert_weight_to_int4pack_for_cpu"
        ):
            try:
                gen = torch.Generator().manual_seed(0)
                w = torch.randn(16, 64, generator=gen)
                x = torch.randn(3, 64, generator=gen)
                p, s, z = quantize_int4_group(w, 32)
                ref = F.linear(x, dequantize_int4_group(p, s, z, 32))
                if _close(_int4_kernel(x, p, s, z, 32), ref):
                    path = "torch._weight_int4pack_mm_for_cpu"
            except RuntimeError:
                pass
        PATHS["int4_linear"] = path
    return PATHS["int4_linear"]


def int4_kernel_supports(N: int, group_size: int) -> bool:
    """Whether torch's CPU int4 kernel takes this shape (else int4_linear dequantizes)."""
    return N % _INT4PACK_N_MULTIPLE == 0 and group_size in _INT4PACK_GROUPS


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype, W the int4 group weight (module doc).

    Uses torch._weight_int4pack_mm_for_cpu on CPU float inputs when it was verified at first use
    (`PATHS["int4_linear"]`) and takes the shape (`int4_kernel_supports`), else dequantizes
    (fp32, then x's dtype) and calls F.linear. The kernel path repacks the weight on every call;
    a caller that reuses a weight should convert it once (a later piece of work).
    """
    N = packed.shape[0]
    use_kernel = (
        x.device.type == "cpu"
        and x.dtype in _FLOATS
        and x.numel() > 0
        and int4_kernel_supports(N, group_size)
        and _probe_int4() == "torch._weight_int4pack_mm_for_cpu"
    )
    if not use_kernel:
        return _reference_linear(x, dequantize_int4_group(packed, scales, zeros, group_size), bias)
    y = _int4_kernel(x.reshape(-1, x.shape[-1]), packed, scales, zeros, group_size)
    y = y.reshape(*x.shape[:-1], N)
    return y if bias is None else y + bias.to(y.dtype)


def int8_embedding(q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of an int8 per-row table (q int8 [V, D], scale fp32 [V]) as fp32 [..., D]."""
    return q[ids].float() * scale[ids].unsqueeze(-1)


# ---------------------------------------------------------------------------------------------
# W8A8: activations quantized too
# ---------------------------------------------------------------------------------------------


def quantize_int8_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (xq int8 [M, K], a fp32 [M]): symmetric per row, dynamic.
    An all-zero row gets a = 1 (no 0/0)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    a = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    xq = torch.round(xf / a[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return xq, a


def int8_a8_linear_reference(x, q, scale, bias=None):
    """The definition of int8_channel_a8 (module doc), exact integer products in float64."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, a = quantize_int8_token(x2)
    acc = xq.double() @ q.double().t()
    y = (acc * a.double()[:, None] * scale.double()[None, :]).to(x.dtype)
    y = y.reshape(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


def _probe_int_mm() -> str:
    if "int8_a8_linear" not in PATHS:
        path = "float64 reference"
        if hasattr(torch, "_int_mm"):
            try:
                gen = torch.Generator().manual_seed(0)
                a = torch.randint(-127, 128, (3, 24), generator=gen, dtype=torch.int8)
                b = torch.randint(-127, 128, (24, 5), generator=gen, dtype=torch.int8)
                if torch.equal(torch._int_mm(a, b), (a.long() @ b.long()).int()):
                    path = "torch._int_mm"
            except RuntimeError:
                pass
        PATHS["int8_a8_linear"] = path
    return PATHS["int8_a8_linear"]


def int8_a8_linear(x, q, scale, bias=None):
    """x [..., K] @ W^T with int8 activations per token and int8 weights per channel (int32
    accumulation; torch._int_mm where it was verified at first use)."""
    if x.device.type != "cpu" or x.numel() == 0 or _probe_int_mm() != "torch._int_mm":
        return int8_a8_linear_reference(x, q, scale, bias)
    x2 = x.reshape(-1, x.shape[-1])
    xq, a = quantize_int8_token(x2)
    acc = torch._int_mm(xq, q.t())
    y = (acc.float() * a[:, None] * scale[None, :]).to(x.dtype)
    y = y.reshape(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


def quantize_fp8_tensor(x: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """x float -> e4m3fn with one static scale: clamp(x / x_scale, ±448) (saturating)."""
    return (x.float() / x_scale.float()).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(_fp8_dtype())


def fp8_a8_linear(x, q, scale, x_scale, bias=None):
    """The definition of fp8_channel_a8 (module doc): fp8 activations (static scale) times fp8
    weights, accumulated in fp32. Dequantizing both operands is exact (every e4m3 value is an
    fp32), so F.linear on them is the reference up to summation order."""
    x2 = x.reshape(-1, x.shape[-1])
    xq = quantize_fp8_tensor(x2, x_scale)
    y = F.linear(xq.float(), q.float()) * (x_scale.float() * scale.float())[None, :]
    y = y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


def cpu_paths() -> dict[str, str]:
    """Runs the first-use checks now and returns a copy of `PATHS` (for reports)."""
    _probe_int8()
    _probe_int4()
    _probe_int_mm()
    return dict(PATHS)
