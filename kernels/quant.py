"""Weight quantization: storage formats, torch references and CPU compute paths.

Pure torch (no builder imports), so the runtime can use it. Every weight is in torch's linear
layout, w [N, K] (N output channels, K input features), and every format dequantizes to that
[N, K] matrix. Formats:

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

`int8_linear`, `int4_linear`, `int8_a8_linear`, `fp8_a8_linear`, `fp8_a8_token_linear` and
`fp8_a8_group_linear` compute x @ W^T (+ bias). On CPU each takes the path measured fastest for its row count
(`KERNEL_MAX_ROWS`): torch's packed kernels (`torch._weight_int8pack_mm`,
`torch._weight_int4pack_mm_for_cpu`, `torch._int_mm`) where they exist and agree with the
reference (checked at first use on a tiny case, then on each weight shape before it runs
there: `_shape_verified`), else the weight dequantized a block of rows at a time and F.linear.
`PATHS` records the path each one takes.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

INT4_MAX = 15
INT8_MAX = 127
FP8_E4M3_MAX = 448.0

# op name -> the compute path it takes on CPU ("dequantize+linear", "torch._weight_int8pack_mm
# (<= 4 rows), else dequantize+linear", ...); filled on first use (or by `cpu_paths()`), so
# importing this module runs no kernel.
PATHS: dict[str, str] = {}

# The largest row count (tokens) for which an op uses torch's packed CPU kernel rather than its
# dequantizing path; 0: never. Chosen by measurement (torch 2.13, 1 thread, an AVX2 x86 CPU,
# SmolLM2-135M's weights: N x K = 960 x 576, 576 x 576, 3072 x 576, 576 x 1536, 49152 x 576):
# every kernel lost at every shape. At M = 1 row, `_weight_int4pack_mm_for_cpu` (its pack
# cached) took 0.9-2.0x the time of the dequantizing path, `_weight_int8pack_mm` 2.2-2.5x,
# `_int_mm` 1.3-2.1x the exact float32 path; at M = 64, 43-66x, 26-30x and 15-18x (the kernels'
# time grows with the rows, a dequantized block of weight rows serves them all). A CPU where a
# kernel wins (their AVX-512 / AMX builds) can raise its limit: the kernels stay verified at
# first use and tested.
KERNEL_MAX_ROWS: dict[str, int] = {"int8_linear": 0, "int4_linear": 0, "int8_a8_linear": 0}

# torch's CPU int4 kernel only takes these group sizes and N a multiple of 16
# (`_weight_int4pack_mm_cpu` / `_convert_weight_to_int4pack_cpu` checks in torch 2.13).
_INT4PACK_GROUPS = (32, 64, 128, 256)
_INT4PACK_N_MULTIPLE = 16
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# linear b_format -> number of weight operands (bias, if any, follows them); see kernels.ops.
FORMAT_OPERANDS = {"dense": 1, "int8_channel": 2, "int4_group": 3, "int8_channel_a8": 2,
                   "fp8_channel_a8": 3, "fp8_channel_a8_token": 2, "fp8_channel_a8_group": 2}


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


# ---------------------------------------------------------------------------------------------
# CPU compute paths
# ---------------------------------------------------------------------------------------------


DEQUANTIZE = "dequantize+linear"
# Weight elements dequantized at a time on CPU (2 MiB of float32): a whole dequantized LM head
# (49152 x 576 fp32, 113 MB) is a fresh allocation that page-faults on every call, 10x slower
# than dequantizing it in cache-sized row blocks, each consumed by F.linear at once.
_CHUNK_ELEMENTS = 1 << 19
# 1024 * 127 * 127 < 2**24: a float32 dot of at most this many int8 x int8 products is exact
# (every partial sum is an integer float32 represents), whatever the summation order.
_EXACT_K = 1024


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # The probes run in fp32, where a correct kernel differs only by summation order.
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def _rows_linear(x2: torch.Tensor, N: int, rows, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K] @ W^T (+ bias) -> [M, N] in x2's dtype, where `rows(i, j)` returns W[i:j] in
    x2's dtype. On CPU, W is produced and used `_CHUNK_ELEMENTS` at a time (see there)."""
    K = x2.shape[-1]
    step = N if x2.device.type != "cpu" else max(1, _CHUNK_ELEMENTS // max(K, 1))
    if step >= N:
        return F.linear(x2, rows(0, N), bias)
    y = torch.empty(x2.shape[0], N, dtype=x2.dtype, device=x2.device)
    for i in range(0, N, step):
        j = min(N, i + step)
        y[:, i:j] = F.linear(x2, rows(i, j), None if bias is None else bias[i:j])
    return y


def _finish(y2: torch.Tensor, x: torch.Tensor, N: int) -> torch.Tensor:
    return y2.reshape(*x.shape[:-1], N)


# ---- int8 weight-only ------------------------------------------------------------------------


def _int8_kernel(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The kernel wants the scales in the activation dtype.
    return torch._weight_int8pack_mm(x2, q, scale.to(x2.dtype))


def _probe_int8() -> bool:
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 24, generator=gen)
    x = torch.randn(3, 24, generator=gen)
    q, s = quantize_int8_channel(w)
    return _close(_int8_kernel(x, q, s), F.linear(x, dequantize_int8_channel(q, s)))


def _dequant_int8_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # dequantize_int8_channel's values, with one allocation (in place).
    return q.float().mul_(scale.float()[:, None]).to(dtype)


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype, W from (q int8 [N, K], scale fp32 [N]).

    Up to `KERNEL_MAX_ROWS["int8_linear"]` rows of float x on CPU: torch._weight_int8pack_mm if
    it was verified at first use; else the weight dequantized (fp32, then x's dtype; on CPU in
    blocks of rows) and F.linear. `PATHS["int8_linear"]` says which.
    """
    _record("int8_linear")
    N = q.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if _use_kernel("int8_linear", x2, N):
        y = _int8_kernel(x2, q, scale)
        return _finish(y if bias is None else y + bias.to(y.dtype), x, N)
    b = None if bias is None else bias.to(x.dtype)
    y = _rows_linear(x2, N, lambda i, j: _dequant_int8_rows(q[i:j], scale[i:j], x.dtype), b)
    return _finish(y, x, N)


# ---- int4 weight-only ------------------------------------------------------------------------

# id(packed) -> (weakref to it, stamp, torch's int4 pack, {dtype: scales_and_zeros}): the pack
# `_weight_int4pack_mm_for_cpu` needs, converted once per weight rather than on every call. The
# stamp (storage, version counter, shape of packed / scales / zeros, group size) catches a
# weight modified in place or a new tensor at a recycled id; the weakref's callback drops the
# entry when the weight is freed.
_INT4_PACKS: dict[int, tuple] = {}


def _stamp(*ts: torch.Tensor) -> tuple:
    # (An inference-mode tensor has no version counter; it cannot change outside that mode.)
    return tuple((t.data_ptr(), None if t.is_inference() else t._version, tuple(t.shape),
                  t.dtype) for t in ts)


def _int4_pack(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4 pack, scales_and_zeros in `dtype`) for torch's CPU int4 kernel, cached per weight.

    torch's kernel computes W = (q - 8) * s + zf with a float zero zf per group, and takes the
    unpacked q as int32 [N, K] (it repacks into its own tiled layout). Ours is W = (q - z) * s,
    so zf = (8 - z) * s. Scales and zeros go as [K // G, N, 2] in x's dtype."""
    key = id(packed)
    stamp = (_stamp(packed, scales, zeros), group_size)
    entry = _INT4_PACKS.get(key)
    if entry is None or entry[0]() is not packed or entry[1] != stamp:
        q = unpack_int4(packed).to(torch.int32)
        pack = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        ref = weakref.ref(packed, lambda _, key=key: _INT4_PACKS.pop(key, None))
        entry = (ref, stamp, pack, {})
        _INT4_PACKS[key] = entry
    by_dtype = entry[3]
    if dtype not in by_dtype:
        s = scales.float()
        zf = (8.0 - zeros.float()) * s
        by_dtype[dtype] = torch.stack((s.t(), zf.t()), dim=-1).contiguous().to(dtype)
    return entry[2], by_dtype[dtype]


def _int4_kernel(
    x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    pack, sz = _int4_pack(packed, scales, zeros, group_size, x2.dtype)
    return torch._weight_int4pack_mm_for_cpu(x2, pack, group_size, sz)


def _probe_int4() -> bool:
    if not (hasattr(torch, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")):
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen)
    x = torch.randn(3, 64, generator=gen)
    p, s, z = quantize_int4_group(w, 32)
    return _close(_int4_kernel(x, p, s, z, 32), F.linear(x, dequantize_int4_group(p, s, z, 32)))


def _dequant_int4_rows(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    # dequantize_int4_group's values ((q - z) * s in fp32), in place after one allocation.
    N = packed.shape[0]
    q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(N, -1, group_size).float()
    w = q.sub_(zeros.float()[..., None]).mul_(scales.float()[..., None])
    return w.reshape(N, -1).to(dtype)


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

    Up to `KERNEL_MAX_ROWS["int4_linear"]` rows of float x on CPU, where torch's kernel takes the
    shape (`int4_kernel_supports`): torch._weight_int4pack_mm_for_cpu if it was verified at first
    use, with the weight converted to its layout once and cached (`_int4_pack`); else the weight
    dequantized (fp32, then x's dtype; on CPU in blocks of rows) and F.linear.
    `PATHS["int4_linear"]` says which.
    """
    _record("int4_linear")
    N = packed.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if int4_kernel_supports(N, group_size) and _use_kernel("int4_linear", x2, N):
        y = _int4_kernel(x2, packed, scales, zeros, group_size)
        return _finish(y if bias is None else y + bias.to(y.dtype), x, N)
    b = None if bias is None else bias.to(x.dtype)

    def rows(i, j):
        return _dequant_int4_rows(packed[i:j], scales[i:j], zeros[i:j], group_size, x.dtype)

    return _finish(_rows_linear(x2, N, rows, b), x, N)


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


def _probe_int_mm() -> bool:
    return hasattr(torch, "_int_mm") and _check_int_mm_shape(
        5, 24, torch.float32, 3, torch.Generator().manual_seed(0))


def _int8_dot_exact(xq: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """xq int8 [M, K] @ q int8 [N, K]^T as exact integers, float64 [M, N]: float32 dots of at
    most `_EXACT_K` products (exact, see there), summed in float64 (exact too)."""
    M, K = xq.shape
    xf = xq.float()
    acc = torch.zeros(M, q.shape[0], dtype=torch.float64, device=xq.device)
    for k0 in range(0, K, _EXACT_K):
        k1 = min(K, k0 + _EXACT_K)
        qk = q[:, k0:k1]
        acc += _rows_linear(xf[:, k0:k1], q.shape[0], lambda i, j, qk=qk: qk[i:j].float())
    return acc


def _probe_int8_exact() -> bool:
    # The worst case for exactness (every product 127 * 127, K = _EXACT_K, so the sums reach
    # 2**24 - 2**18) and a random one, against integer arithmetic. Fails where float32 matmuls
    # are computed in reduced precision (e.g. torch.set_float32_matmul_precision on some CPUs).
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.full((2, _EXACT_K), 127, dtype=torch.int8),
              torch.full((3, _EXACT_K), -127, dtype=torch.int8)),
             (torch.randint(-127, 128, (3, 1100), generator=gen, dtype=torch.int8),
              torch.randint(-127, 128, (5, 1100), generator=gen, dtype=torch.int8))]
    return all(torch.equal(_int8_dot_exact(a, b), (a.long() @ b.long().t()).double())
               for a, b in cases)


def int8_a8_linear(x, q, scale, bias=None):
    """x [..., K] @ W^T with int8 activations per token and int8 weights per channel, the int8
    products accumulated exactly (module doc: int8_channel_a8).

    On CPU, up to `KERNEL_MAX_ROWS["int8_a8_linear"]` rows: torch._int_mm (int32) if verified at
    first use; otherwise exact float32 dots (`_int8_dot_exact`, verified at first use), scaled
    in float64 like the reference; elsewhere, and if neither verified, the float64 reference.
    `PATHS["int8_a8_linear"]` says which."""
    _record("int8_a8_linear")
    N = q.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if x.device.type != "cpu" or x2.shape[0] == 0:
        return int8_a8_linear_reference(x, q, scale, bias)
    if _use_kernel("int8_a8_linear", x2, N):
        xq, a = quantize_int8_token(x2)
        acc = torch._int_mm(xq, q.t())
        y = (acc.float() * a[:, None] * scale[None, :]).to(x.dtype)
    elif _verified("int8_a8_exact"):
        xq, a = quantize_int8_token(x2)
        acc = _int8_dot_exact(xq, q)
        y = (acc * a.double()[:, None] * scale.double()[None, :]).to(x.dtype)
    else:
        return int8_a8_linear_reference(x, q, scale, bias)
    y = _finish(y, x, N)
    return y if bias is None else y + bias.to(y.dtype)


def quantize_fp8_tensor(x: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """x float -> e4m3fn with one static scale: clamp(x / x_scale, ±448) (saturating)."""
    return (x.float() / x_scale.float()).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(_fp8_dtype())


def _fp8_div256(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32 values / 256, exactly, about 10x faster than q.float() on CPU
    (which converts in software). The e4m3 bits s eeee mmm shifted left by 7 are the float16
    s 0eeee mmm0000000: the same digits with float16's exponent bias (15 vs 7), i.e. the value
    times 2**-8, subnormals included; float16 -> float32 is a hardware conversion. (As int16 the
    byte is sign-extended; bit 14 gets a copy of the sign and is cleared.) NaN (never stored: the
    quantizers clamp) would come out finite."""
    h = q.view(torch.int8).to(torch.int16)
    return h.bitwise_left_shift_(7).bitwise_and_(-16385).view(torch.float16).float()


def _probe_fp8_bits() -> bool:
    if not hasattr(torch, "float8_e4m3fn"):
        return False
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    want = every.float()
    finite = ~want.isnan()
    return torch.equal((_fp8_div256(every) * 256.0)[finite], want[finite])


def fp8_a8_linear(x, q, scale, x_scale, bias=None):
    """The definition of fp8_channel_a8 (module doc): fp8 activations (static scale) times fp8
    weights, accumulated in fp32. Dequantizing both operands is exact (every e4m3 value is an
    fp32), so F.linear on them is the reference up to summation order; on CPU `_fp8_dot`
    dequantizes them faster, exactly. (torch._scaled_mm also runs on CPU, but measured 3-22x slower than this at
    SmolLM2's shapes, M = 1 and 64; see KERNEL_MAX_ROWS.)"""
    _record("fp8_a8_linear")
    N = q.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    c = x_scale.float() * scale.float()
    y = _fp8_dot(quantize_fp8_tensor(x2, x_scale), q) * c[None, :]
    y = _finish(y.to(x.dtype), x, N)
    return y if bias is None else y + bias.to(y.dtype)


def _fp8_dot(xq: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """xq.float() @ q.float()^T for e4m3 xq [M, K] and q [N, K], float32 [M, N]. Every product
    is exact in float32; on CPU both operands are dequantized through `_fp8_div256` (verified
    at first use) a block of weight rows at a time, and the 2**-16 that puts on each product is
    undone by an exact power-of-two multiply."""
    if xq.device.type == "cpu" and _verified("fp8_bits"):
        acc = _rows_linear(_fp8_div256(xq), q.shape[0], lambda i, j: _fp8_div256(q[i:j]))
        return acc * 65536.0
    return F.linear(xq.float(), q.float())


def quantize_fp8_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (xq float8_e4m3fn [M, K], a fp32 [M]): one scale per row, dynamic,
    a = amax|x_row| / 448. An all-zero row gets a = 1 (no 0/0). The one-group case of
    `quantize_fp8_token_group`."""
    xq, a = quantize_fp8_token_group(x, x.shape[-1])
    return xq, a[:, 0]


def fp8_a8_token_linear(x, q, scale, bias=None):
    """The definition of fp8_channel_a8_token (module doc): fp8 activations with one dynamic
    scale per token times fp8 weights, accumulated in fp32 (`_fp8_dot`, as fp8_a8_linear)."""
    _record("fp8_a8_token_linear")
    N = q.shape[0]
    xq, a = quantize_fp8_token(x.reshape(-1, x.shape[-1]))
    y = _fp8_dot(xq, q) * a[:, None] * scale.float()[None, :]
    y = _finish(y.to(x.dtype), x, N)
    return y if bias is None else y + bias.to(y.dtype)


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


def fp8_a8_group_linear(x, q, scale, group_size, bias=None):
    """The definition of fp8_channel_a8_group (module doc): fp8 activations with one dynamic
    scale per token and group of `group_size` channels times fp8 weights, in fp32. The scales
    vary along K, so they are applied to the activations before the dot: xq * a is rounded to
    fp32 once per element (2**-24 relative), where the kernel scales each group's exact dot."""
    _record("fp8_a8_group_linear")
    N, K = q.shape
    xq, a = quantize_fp8_token_group(x.reshape(-1, K), group_size)
    if x.device.type == "cpu" and _verified("fp8_bits"):
        xd = _fp8_div256(xq).reshape(-1, K // group_size, group_size) * (a * 256.0)[..., None]
        y = _rows_linear(xd.reshape(-1, K), N, lambda i, j: _fp8_div256(q[i:j])) * 256.0
    else:
        xd = xq.float().reshape(-1, K // group_size, group_size) * a[..., None]
        y = F.linear(xd.reshape(-1, K), q.float())
    y = _finish((y * scale.float()[None, :]).to(x.dtype), x, N)
    return y if bias is None else y + bias.to(y.dtype)


# ---------------------------------------------------------------------------------------------
# Path choice and first-use checks
# ---------------------------------------------------------------------------------------------

# check name -> probe: does the fast path exist here and agree with the reference?
_PROBES = {
    "int8_linear": _probe_int8,
    "int4_linear": _probe_int4,
    "int8_a8_linear": _probe_int_mm,
    "int8_a8_exact": _probe_int8_exact,
    "fp8_bits": _probe_fp8_bits,
}
_KERNELS = {"int8_linear": "torch._weight_int8pack_mm",
            "int4_linear": "torch._weight_int4pack_mm_for_cpu",
            "int8_a8_linear": "torch._int_mm"}
_VERIFIED: dict[str, bool] = {}


def _verified(check: str) -> bool:
    """Runs the probe of `check` once (a probe that raises fails)."""
    if check not in _VERIFIED:
        try:
            _VERIFIED[check] = bool(_PROBES[check]())
        except (RuntimeError, NotImplementedError, TypeError):
            _VERIFIED[check] = False
    return _VERIFIED[check]


# A torch kernel runs a weight shape only when K is a multiple of this and the kernel agreed
# with the dequantizing path on that very shape (`_shape_verified`). On an AVX-512/VNNI CPU
# `torch._int_mm` returned 1.39e5 for a 1 x 1 @ 1 x 2 product whose exact value is 0 (its
# blocked loops read past a K that is not a multiple of their step), while the tiny probe
# shape agreed: a check on one shape says nothing about another. Model layers are multiples
# of 64 wide.
_KERNEL_K_MULTIPLE = 16
# (op, N, K, dtype, row class) -> did the kernel agree with the reference on that shape?
_SHAPE_VERIFIED: dict[tuple, bool] = {}


def _use_kernel(op: str, x2: torch.Tensor, N: int) -> bool:
    rows, K = x2.shape
    limit = KERNEL_MAX_ROWS.get(op, 0)
    return (x2.device.type == "cpu" and x2.dtype in _FLOATS and 0 < rows <= limit
            and K % _KERNEL_K_MULTIPLE == 0 and _verified(op)
            and _shape_verified(op, N, K, x2.dtype, min(rows, limit)))


def _shape_verified(op: str, N: int, K: int, dtype: torch.dtype, rows: int) -> bool:
    """Runs torch's kernel for `op` on random operands of this weight shape, at 1 row and at
    `rows` rows (the size class of the call: the kernels switch loops by row count), against
    the path used otherwise; cached per (op, N, K, dtype, row class)."""
    row_class = 1 if rows == 1 else 2 if rows <= 4 else 3
    key = (op, N, K, dtype, row_class)
    if key not in _SHAPE_VERIFIED:
        gen = torch.Generator().manual_seed(N * 7919 + K)
        try:
            _SHAPE_VERIFIED[key] = all(_SHAPE_CHECKS[op](N, K, dtype, m, gen)
                                       for m in sorted({1, rows}))
        except (RuntimeError, NotImplementedError, TypeError):
            _SHAPE_VERIFIED[key] = False
    return _SHAPE_VERIFIED[key]


def _check_int8_shape(N: int, K: int, dtype: torch.dtype, M: int, gen) -> bool:
    q, s = quantize_int8_channel(torch.randn(N, K, generator=gen))
    x = torch.randn(M, K, generator=gen).to(dtype)
    return _agrees(_int8_kernel(x, q, s), x, dequantize_int8_channel(q, s))


def _check_int4_shape(N: int, K: int, dtype: torch.dtype, M: int, gen) -> bool:
    G = next(g for g in reversed(_INT4PACK_GROUPS) if K % g == 0)
    p, s, z = quantize_int4_group(torch.randn(N, K, generator=gen), G)
    x = torch.randn(M, K, generator=gen).to(dtype)
    return _agrees(_int4_kernel(x, p, s, z, G), x, dequantize_int4_group(p, s, z, G))


def _check_int_mm_shape(N: int, K: int, dtype: torch.dtype, M: int, gen) -> bool:
    a = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    return torch.equal(torch._int_mm(a, b.t()), (a.long() @ b.long().t()).int())


def _agrees(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """y = x @ w^T up to a few roundings of x's dtype per product and per sum: a correct kernel
    differs by summation order and precision; a wrong one (garbage, a skipped block) by far more."""
    eps = 8 * torch.finfo(x.dtype).eps
    bound = eps * (x.float().abs() @ w.float().abs().t()) + eps
    return y.shape == (x.shape[0], w.shape[0]) and bool(
        ((y.float() - x.float() @ w.float().t()).abs() <= bound).all())


_SHAPE_CHECKS = {"int8_linear": _check_int8_shape, "int4_linear": _check_int4_shape,
                 "int8_a8_linear": _check_int_mm_shape}


def _fallback(op: str) -> str:
    if op == "int8_a8_linear":
        return "exact float32 linear" if _verified("int8_a8_exact") else "float64 reference"
    if op in ("fp8_a8_linear", "fp8_a8_token_linear", "fp8_a8_group_linear"):
        return DEQUANTIZE + (" (float16 bit cast)" if _verified("fp8_bits") else "")
    return DEQUANTIZE


def _record(op: str) -> None:
    """Sets PATHS[op] (once; `cpu_paths` refreshes it) to the path `op` takes on CPU."""
    if op in PATHS:
        return
    limit = KERNEL_MAX_ROWS.get(op, 0)
    if limit > 0 and _verified(op):
        PATHS[op] = (f"{_KERNELS[op]} (<= {limit} rows, on weight shapes it verifies on), "
                     f"else {_fallback(op)}")
    else:
        PATHS[op] = _fallback(op)


def cpu_paths() -> dict[str, str]:
    """Runs the first-use checks the paths need now and returns the path each op takes on CPU
    (a copy of `PATHS`)."""
    for op in ("int8_linear", "int4_linear", "int8_a8_linear", "fp8_a8_linear",
               "fp8_a8_token_linear", "fp8_a8_group_linear"):
        PATHS.pop(op, None)
        _record(op)
    return dict(PATHS)
