"""Weight quantization: the formats' numerics (quantize, dequantize, their exact definitions).

Pure torch (no builder imports), so the runtime can use it. The formats as values (their
stored parts, how a split cuts them) are `kernels.formats`; this module is their numerics: what
each stored tensor holds, how a weight or an activation is rounded onto it, and what product a
W8A8 format defines. It chooses no kernel and keeps no state. The products themselves (the
torch reference each format's `linear` calls, with its CPU paths) are `kernels.quant_linear`;
torch's CPU kernels behind them and their first-use checks are `kernels.cpu_kernels`. Every
weight is in torch's linear layout, w [N, K] (N output channels, K input features), and every
format dequantizes to that [N, K] matrix. Formats:

* int8 per channel ("int8_channel", the `b_format` of `kernels/triton/gemm.py`):
  q int8 [N, K], scale float32 [N]; W = q.float() * scale[:, None]. Symmetric, q in -127..127.
* int4 per group: packed uint8 [N, K // 2], scales float32 [N, K // G], zeros float32
  [N, K // G] (G = group size, dividing K); W[n, k] = (q[n, k] - zeros[n, k // G]) *
  scales[n, k // G] with q in 0..15 and the zero point a real number in [0, 15], so a group's
  grid spans exactly its [min, max] (llama.cpp's Q4_1 min and TensorRT-LLM's fp16 zeros are the
  same thing). Engines built before zero points were float store them as uint8 integers, which
  every consumer still takes. Two nibbles per byte: byte j of a row holds column 2j in its LOW
  nibble and column 2j + 1 in its HIGH nibble.
* fp8 per channel: q float8_e4m3fn [N, K], scale float32 [N]; W = q.float() * scale[:, None].

Three formats also quantize the activations (W8A8), computing the product in low precision:

* int8_channel_a8: the int8 per-channel weight; x is quantized per token (row), dynamically:
  a = amax|x_row| / 127, xq = round(x / a) in -127..127; y = (xq @ q^T) * a[:, None] * scale.
* fp8_channel_a8: the fp8 per-channel weight; x is quantized with one static fp32 scale
  x_scale (from calibration): xq = e4m3(clamp(x / x_scale, ±448));
  y = (xq.float() @ q.float()^T) * x_scale * scale.
* fp8_channel_a8_token: the fp8 per-channel weight; x is quantized per token (row),
  dynamically: a = amax|x_row| / 448 (1 for an all-zero row), xq = e4m3(x / a);
  y = (xq.float() @ q.float()^T) * a[:, None] * scale. Each row's largest value is exact.
* fp8_channel_a8_group: the fp8 per-channel weight; x is quantized per token and group of G
  consecutive input channels (node attribute group_size, a power of two dividing K),
  dynamically: a [M, K // G] = amax|x[m, group]| / 448, xq = e4m3(x / a);
  y[m, n] = scale[n] * sum_g a[m, g] * (xq[m, g] . q[n, g]) (DeepSeek-V3's 1 x 128 activation
  tiles with per-channel weights). Each group's largest value is exact.
"""

from __future__ import annotations

import torch

INT4_MAX = 15
INT8_MAX = 127
FP8_E4M3_MAX = 448.0


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
# int4, asymmetric per group with float zero points
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


def int4_range(g: torch.Tensor, keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of each group g [..., G] (over the last dim), widened to include 0, which keeps
    the zero point in [0, 15]."""
    return (g.amin(dim=-1, keepdim=keepdim).clamp(max=0.0),
            g.amax(dim=-1, keepdim=keepdim).clamp(min=0.0))


def int4_range_params(lo: torch.Tensor, hi: torch.Tensor, integer: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 of a group whose grid runs from lo <= 0 to hi >= 0: scale =
    (hi - lo) / 15 and zero = -lo / scale in [0, 15], so code 0 lands on lo and 15 on hi; an
    empty range (hi == lo == 0) gets scale 1, zero 0. The one rule for every int4 quantizer
    (round to nearest, AWQ's clip search, GPTQ). `integer`: the zero point rounded to the
    nearest integer (`--int4-zero-point integer`, the uint8 zeros of engines before float
    ones).

    The zero point is not rounded to an integer: an integer zero shifts the grid by up to half
    a step, so one end of the range falls off it and its values clip, and the search over
    ranges chases that shift. Kept real, the grid spans the range exactly (held-out SmolLM2
    int4-awq +11.9% -> +9.5%)."""
    span = hi - lo
    scale = torch.where(span > 0, span / INT4_MAX, torch.ones_like(span))
    zero = ((0.0 - lo) / scale).clamp_(0, INT4_MAX)  # 0 - lo: no -0.0 zero points
    return scale, (zero.round_() if integer else zero)


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The codes (float, integers in 0..15) of w on the grid (q - zero) * scale: the nearest."""
    return torch.round(w / scale + zero).clamp_(0, INT4_MAX)


def quantize_int4_group(
    w: torch.Tensor, group_size: int = 128, integer_zeros: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (packed uint8 [N, K // 2], scales float32 [N, K // G], zeros float32 [N, K // G]).

    Asymmetric per group of G consecutive columns: `int4_range` (the range widened to include
    0), then `int4_range_params` and `int4_codes`. Every element is within scale / 2 of its
    dequantized value (nothing clips: the grid spans the range). A group of zeros gets scale 1,
    zero 0. G must divide K (see `resolve_group_size`) and K must be even
    (two nibbles per byte). `integer_zeros`: zero points rounded to integers and stored as
    uint8 (the grid then shifts by up to half a step and a range end may clip: still within
    scale / 2, but the ends are no longer exact).
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
    scales, zeros = int4_range_params(*int4_range(g), integer_zeros)
    q = int4_codes(g, scales[..., None], zeros[..., None])
    return pack_int4(q.reshape(N, K)), scales, (zeros.to(torch.uint8) if integer_zeros else zeros)


def dequantize_int4_group(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(packed uint8 [N, K // 2], scales fp32 [N, K // G], zeros [N, K // G] float32, or uint8
    in engines from before float zero points) -> W [N, K] in `dtype`."""
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


def quantize_fp8_tensor(x: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """x float -> e4m3fn with one static scale: clamp(x / x_scale, ±448) (saturating)."""
    return (x.float() / x_scale.float()).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(_fp8_dtype())


def quantize_fp8_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (xq float8_e4m3fn [M, K], a fp32 [M]): one scale per row, dynamic,
    a = amax|x_row| / 448. An all-zero row gets a = 1 (no 0/0). The one-group case of
    `quantize_fp8_token_group`."""
    xq, a = quantize_fp8_token_group(x, x.shape[-1])
    return xq, a[:, 0]


def quantize_fp8_token_group(x: torch.Tensor, group_size: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (xq float8_e4m3fn [M, K], a fp32 [M, K // G]): one scale per row and
    group of G columns, dynamic, a = amax / 448 (1 for an all-zero group)."""
    M, K = x.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(f"fp8 activation group size {group_size} does not divide K={K}")
    g = x.float().reshape(M, K // group_size, group_size)
    amax = g.abs().amax(dim=-1)
    a = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    xq = (g / a[..., None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(_fp8_dtype())
    return xq.reshape(M, K), a
