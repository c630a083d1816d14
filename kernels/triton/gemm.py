"""GEMM kernels (`templates/gemm.py.j2`) for the IR ops `linear` and `matmul`.

Calling convention of a rendered module's `launch` = the reference op's:

* `linear`: `launch(x, w, b=None)` with x [..., K], w [N, K] (torch layout) -> [..., N];
  the leading dims of x are flattened to M rows (M is a runtime argument, never a constexpr).
* `matmul`: `launch(a, b)`; b is [K, N] with a [..., K] (flattened to M rows), or both are
  batched with equal batch dims, a [*B, M, K] @ b [*B, K, N] (one grid axis per batch).

Node attributes understood (any other attribute -> `params` returns None, the builder keeps
the reference op):

* `"epilogue": {"act": A, "residual": R}` - fused epilogue, applied in fp32 to the accumulator
  before the single rounding to the output dtype:
  `out = act(x @ W^T + bias) + residual`. A is one of `ACTIVATIONS` ("none" by default; the
  torch meaning of each is `kernels.ops._ACTS`: silu, gelu (erf), gelu_tanh, relu). R (bool,
  default False) adds one more input, shaped and typed like the output, as the LAST input.
  The bias is not an attribute: a `linear` node has one iff its inputs include it. So the
  inputs of a `linear` node are `x, <B operands>, [bias], [residual]`, of a `matmul` node
  `a, b, [residual]`. Plain `linear`/`matmul` nodes have no `epilogue` attribute.
* `"b_format": F` - how the weight is stored (`linear` only; default "dense"). `FORMATS` maps
  each format to the operands it takes in place of `w`, in input order:
    - "dense":        w [N, K] in the activation dtype
    - "int8_channel": w int8 [N, K], w_scale float32 [N]; W = w.float() * w_scale[:, None]
    - "int4_group":   w uint8 [N, K // 2] (two nibbles per byte, the low one the even column),
                      w_scales float32 [N, K // G], w_zeros float32 [N, K // G], with the
                      node attribute `"group_size": G` (G divides K, K even; recorded in the
                      params as `group_size`); W = (q - zero) * scale per group of G columns.
                      Engines from before float zero points have uint8 w_zeros: their params
                      lack `zero_dtype`, which float zeros record as "float32"
    - "int8_channel_a8": w int8 [N, K], w_scale float32 [N], and the activations quantized
                      to int8 per row inside the kernel (a = amax|x_row| / 127, SmoothQuant
                      W8A8): an int8 x int8 -> int32 dot, scaled by a * w_scale after the loop
    - "fp8_channel_a8": w float8_e4m3fn [N, K], w_scale float32 [N], x_scale float32 [1]: the
                      activations quantized to e4m3 with the static x_scale, an fp8 dot with
                      fp32 accumulation, scaled by x_scale * w_scale after the loop
    - "fp8_channel_a8_token": w float8_e4m3fn [N, K], w_scale float32 [N], and the
                      activations quantized to e4m3 per row inside the kernel (a =
                      amax|x_row| / 448): the fp8 dot, scaled by a * w_scale after the loop
    - "fp8_channel_a8_group": as fp8_channel_a8_token with one activation scale per row and
                      group of G input channels (node attribute `"group_size": G`, a power
                      of two >= 32 dividing K; the K tile is the group, BLOCK_K = G)
  The formats are defined exactly in `kernels/quant.py`; `kernels.ops.linear` with the same
  `b_format` is the torch reference. A format is one macro `b_<format>` in the template
  (loads/dequantizes the B tile, may quantize the A tile and replace the dot, and may fix up
  the accumulator after the K loop) plus an entry here that checks its operands.

Parameters (`params` returns them; `source` renders them): op, N, K, a_dtype, out_dtype,
b_format, bias, act, residual, batched, input_precision (plus group_size for the `GROUPED`
formats),
and the tiling BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages. The tiling comes
from `configs(M_hint, N, K, device, dtype=a_dtype, b_format=...)`: `params` takes its first
entry for this machine's device (cuda if torch sees one, else cpu); a builder that times
kernels on a GPU may replace the tiling keys with any other entry of the same `configs` call
(`{**p, **cfg}`; pass the group size: a `TILE_IS_GROUP` format's BLOCK_K is its group). Every
tiling computes the same thing for every format (int4_group takes any BLOCK_K: a K tile
inside one group loads one scale per column, else one per element); the 8-bit dots of the
"_a8" formats need BLOCK_K >= 32 to compile for a GPU, which `configs` ensures for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from llm_engine.kernels import codegen, formats, quant
from llm_engine.kernels.triton import is_int, next_pow2, static_numel

TEMPLATE = "gemm"

FLOATS = ("float32", "float16", "bfloat16")
ACTIVATIONS: dict[str, Callable] = {
    "none": lambda y: y,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "relu": F.relu,
}
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def _check_dense(shapes, dtypes, N, K, a_dtype, group_size) -> bool:
    (w,), (wd,) = shapes, dtypes
    return tuple(w) == (N, K) and wd == a_dtype


def _check_int8_channel(shapes, dtypes, N, K, a_dtype, group_size) -> bool:
    (w, s), (wd, sd) = shapes, dtypes
    return tuple(w) == (N, K) and wd == "int8" and tuple(s) == (N,) and sd == "float32"


def _check_int4_group(shapes, dtypes, N, K, a_dtype, group_size) -> bool:
    (w, s, z), (wd, sd, zd) = shapes, dtypes
    G = group_size
    if not (is_int(G) and G > 0 and K % G == 0 and K % 2 == 0):
        return False
    return (tuple(w) == (N, K // 2) and wd == "uint8" and tuple(s) == (N, K // G)
            and sd == "float32" and tuple(z) == (N, K // G) and zd in ("float32", "uint8"))


def _check_fp8_channel(shapes, dtypes, N, K, a_dtype, group_size) -> bool:
    (w, s), (wd, sd) = shapes, dtypes
    return tuple(w) == (N, K) and wd == "float8_e4m3fn" and tuple(s) == (N,) and sd == "float32"


def _check_fp8_channel_group(shapes, dtypes, N, K, a_dtype, group_size) -> bool:
    G = group_size  # the K tile: an 8-bit tensor-core dot needs 32
    return (is_int(G) and G >= 32 and G & (G - 1) == 0 and K % G == 0
            and _check_fp8_channel(shapes, dtypes, N, K, a_dtype, group_size))


def _check_fp8_channel_a8(shapes, dtypes, N, K, a_dtype, group_size) -> bool:
    (w, s, xs), (wd, sd, xsd) = shapes, dtypes
    return (_check_fp8_channel((w, s), (wd, sd), N, K, a_dtype, group_size)
            and tuple(xs) == (1,) and xsd == "float32")


# Torch semantics of each format, in `reference`'s compute dtype: the weight dequantized to
# [N, K], and the activations as the kernel feeds them to the dot, dequantized (quantized in
# float32 as kernels/quant.py defines it; then xq * a is exact in float64, so the float64
# oracle of the tests is the format's definition up to float64 summation order).

def _dequant_dense(w, group_size=None):
    return w


def _dequant_int8_channel(w, scale, group_size=None):
    return w.to(scale.dtype) * scale[:, None]


def _dequant_int4_group(w, scales, zeros, group_size):
    q = quant.unpack_int4(w).to(scales.dtype)
    N, K = q.shape
    g = q.reshape(N, K // group_size, group_size)
    return ((g - zeros.to(scales.dtype)[..., None]) * scales[..., None]).reshape(N, K)


def _dequant_fp8_channel(w, scale, x_scale=None, group_size=None):
    return w.to(scale.dtype) * scale[:, None]


def _a_int8_token(a, w, scale, group_size=None):
    xq, s = quant.quantize_int8_token(a.reshape(-1, a.shape[-1]).float())
    return (xq.to(a.dtype) * s.to(a.dtype)[:, None]).reshape(a.shape)


def _a_fp8_tensor(a, w, scale, x_scale, group_size=None):
    return quant.quantize_fp8_tensor(a.float(), x_scale.float()).to(a.dtype) * x_scale


def _a_fp8_token(a, w, scale, group_size=None):
    return _a_fp8_group(a, w, scale, a.shape[-1])


def _a_fp8_group(a, w, scale, group_size):
    K = a.shape[-1]
    xq, s = quant.quantize_fp8_token_group(a.reshape(-1, K).float(), group_size)
    g = xq.to(a.dtype).reshape(-1, K // group_size, group_size) * s.to(a.dtype)[..., None]
    return g.reshape(a.shape)


class Format(NamedTuple):
    """What the GEMM template needs of a weight format (`kernels.formats`, which holds its
    parts and operand count)."""

    check: Callable  # (shapes, dtypes, N, K, a_dtype, group_size) -> bool
    dequant: Callable  # (*operands, group_size=) -> W [N, K]
    quant_a: Callable | None = None  # (a, *operands, group_size=) -> a as the dot sees it


FORMATS: dict[str, Format] = {
    "dense": Format(_check_dense, _dequant_dense),
    "int8_channel": Format(_check_int8_channel, _dequant_int8_channel),
    "int4_group": Format(_check_int4_group, _dequant_int4_group),
    "int8_channel_a8": Format(_check_int8_channel, _dequant_int8_channel, _a_int8_token),
    "fp8_channel_a8": Format(_check_fp8_channel_a8, _dequant_fp8_channel, _a_fp8_tensor),
    "fp8_channel_a8_token": Format(_check_fp8_channel, _dequant_fp8_channel, _a_fp8_token),
    "fp8_channel_a8_group": Format(_check_fp8_channel_group, _dequant_fp8_channel,
                                   _a_fp8_group),
}
# need BLOCK_K >= 32 on a GPU: the formats that quantize the activations to 8 bits
EIGHT_BIT_DOT = tuple(name for name, f in formats.FORMATS.items() if f.activations)
GROUPED = formats.GROUPED
# formats whose K tile is exactly one group (BLOCK_K = group_size in every tiling)
TILE_IS_GROUP = ("fp8_channel_a8_group",)


def _epilogue(attrs: dict) -> tuple[str, bool] | None:
    epi = attrs.get("epilogue") or {}
    if not isinstance(epi, dict) or set(epi) - {"act", "residual"}:
        return None
    act, residual = epi.get("act", "none"), epi.get("residual", False)
    if act not in ACTIVATIONS or not isinstance(residual, bool):
        return None
    return act, residual


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def params(op: str, attrs: dict, in_shapes: list[tuple], in_dtypes: list[str],
           out_dtype: str) -> dict | None:
    """The template parameters for a `linear`/`matmul` node, or None if this family cannot
    implement it (the builder then keeps the reference op)."""
    if op not in ("linear", "matmul") or set(attrs) - {"epilogue", "b_format", "group_size"}:
        return None
    if ("group_size" in attrs) != (attrs.get("b_format") in GROUPED):
        return None  # the grouped formats need their group size; no other format takes one
    epi = _epilogue(attrs)
    b_format = attrs.get("b_format", "dense")
    if epi is None or b_format not in FORMATS or (op == "matmul" and b_format != "dense"):
        return None
    act, residual = epi
    shapes = [tuple(s) for s in in_shapes]
    n_b = formats.get(b_format).operands
    group_size = attrs.get("group_size")
    n_bias = len(shapes) - 1 - n_b - residual
    if len(in_dtypes) != len(shapes) or n_bias not in ((0, 1) if op == "linear" else (0,)):
        return None
    a_shape, a_dtype = shapes[0], in_dtypes[0]
    if a_dtype not in FLOATS or out_dtype != a_dtype or not a_shape:
        return None
    b_shapes, b_dtypes = shapes[1:1 + n_b], in_dtypes[1:1 + n_b]
    batched = False
    if op == "linear":
        K = a_shape[-1]
        N = b_shapes[0][0] if len(b_shapes[0]) == 2 else None
        lead = a_shape[:-1]
        out_shape = (*lead, N)
    else:
        b = b_shapes[0]
        if len(b) == 2:
            K, N = b
            lead = a_shape[:-1]
            out_shape = (*lead, N)
            if a_shape[-1] != K:
                return None
        elif len(b) >= 3 and len(a_shape) == len(b) and a_shape[:-2] == b[:-2] \
                and a_shape[-1] == b[-2]:
            batched = True
            K, N = b[-2:]
            lead = a_shape[:-1]
            out_shape = (*lead, N)
        else:
            return None
    if not (is_int(K) and is_int(N) and K > 0 and N > 0):
        return None
    if op == "linear" and not FORMATS[b_format].check(b_shapes, b_dtypes, N, K, a_dtype,
                                                       group_size):
        return None
    if op == "matmul" and b_dtypes[0] != a_dtype:  # dense; its shape was checked above
        return None
    if n_bias and (shapes[1 + n_b] != (N,) or in_dtypes[1 + n_b] != a_dtype):
        return None
    if residual and (shapes[-1] != out_shape or in_dtypes[-1] != out_dtype):
        return None
    p: dict[str, Any] = {
        "op": op, "N": N, "K": K, "a_dtype": a_dtype, "out_dtype": out_dtype,
        "b_format": b_format, "bias": bool(n_bias), "act": act, "residual": residual,
        "batched": batched, "input_precision": "ieee",
    }
    if b_format in GROUPED:
        p["group_size"] = group_size
    if b_format == "int4_group" and b_dtypes[2] == "float32":
        # Only float zero points record it: engines from before them (uint8 zeros) have no
        # such parameter, so their stored kernels still re-render byte for byte.
        p["zero_dtype"] = "float32"
    m_hint = static_numel(a_shape[-2:-1] if batched else lead)
    p.update(configs(m_hint, N, K, default_device(), dtype=a_dtype, b_format=b_format,
                     group_size=group_size)[0])
    return p



def _smem_limit(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return 160 * 1024  # building for a GPU elsewhere: fits A100 (164 KiB) and H100 (227 KiB)


def _tilings(M_hint: int | None, N: int, K: int, cuda: bool, b_format: str,
             group_size: int | None) -> list[tuple[int, ...]]:
    """The candidate tilings (TILE_KEYS order) before any shared-memory cut of num_stages."""
    if b_format in TILE_IS_GROUP and not is_int(group_size):
        raise ValueError(f"{b_format} tilings need the group size (BLOCK_K = group_size)")
    k_min = 32 if b_format in EIGHT_BIT_DOT else 16
    n_cap, k_cap = max(16, next_pow2(N)), max(k_min, next_pow2(K))
    if not cuda:
        bm = min(max(16, next_pow2(M_hint or 64)), 64)
        cands = [(bm, 64, 64, 8, 4, 1), (16, 32, 32, 4, 4, 1)]
    elif M_hint is not None and M_hint <= 16:  # decode: skinny A, stream B
        cands = [(16, 64, 128, 1, 4, 4), (16, 128, 64, 1, 4, 4), (16, 64, 256, 1, 4, 3),
                 (16, 32, 128, 1, 2, 5), (16, 128, 128, 1, 8, 3)]
    elif M_hint is not None and M_hint <= 64:
        cands = [(32, 64, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (32, 128, 64, 8, 4, 4),
                 (64, 128, 64, 8, 4, 3), (32, 64, 128, 8, 4, 3)]
    else:  # prefill / unknown
        cands = [(128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4),
                 (128, 64, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (128, 128, 32, 8, 4, 4)]
    return [(bm, min(bn, n_cap), group_size if b_format in TILE_IS_GROUP else min(bk, k_cap),
             gm, nw, ns) for bm, bn, bk, gm, nw, ns in cands]


def tiling_allowed(p: dict) -> bool:
    """Whether `p`'s tiling is one the builder can have recorded for its shape and format: a
    candidate of `configs` for some row count on CPU or CUDA (the build host's choice, or the
    autotuner's), num_stages possibly cut for shared memory. The runtime checks an engine's
    recorded tiling with this; the other GEMM parameters follow from the plan node."""
    tile = tuple(p.get(k) for k in TILE_KEYS)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in tile):
        return False
    N, K, b_format, group_size = p["N"], p["K"], p.get("b_format", "dense"), p.get("group_size")
    for cuda in (False, True):
        for m in (1, 16, 32, 64, 512, None):  # every branch of _tilings
            for cand in _tilings(m, N, K, cuda, b_format, group_size):
                if tile[:-1] == cand[:-1] and 1 <= tile[-1] <= cand[-1]:
                    return True
    return False


def configs(M_hint: int | None, N: int, K: int, device: str | torch.device = "cpu", *,
            dtype: str = "float16", b_format: str = "dense",
            group_size: int | None = None) -> list[dict]:
    """Candidate tilings, best guess first. M_hint is the expected row count (tokens), None if
    unknown. On CUDA the builder times them; on CPU (the Triton interpreter, where large tiles
    mean fewer, cheaper numpy steps) the first is used. On CUDA, num_stages is lowered where
    the pipelined A and B tiles of `dtype` (and int4's per-element scales and zero points)
    would not fit in shared memory. The 8-bit dots of
    `EIGHT_BIT_DOT` formats get BLOCK_K >= 32 (the smallest K of an 8-bit tensor-core dot);
    `TILE_IS_GROUP` formats get BLOCK_K = group_size."""
    dev = torch.device(device)
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)
    limit = _smem_limit(dev) if dev.type == "cuda" else None
    out: list[dict] = []
    for bm, bn, bk, gm, nw, ns in _tilings(M_hint, N, K, dev.type == "cuda", b_format,
                                           group_size):
        stage = (bm * bk + bk * bn) * itemsize
        if b_format == "int4_group" and (group_size is None or group_size % bk):
            # a tile spanning groups gathers a scale and a zero point per element: two more
            # fp32 [BLOCK_K, BLOCK_N] tiles in every pipeline stage
            stage += bk * bn * 8
        while limit and ns > 1 and ns * stage > limit:
            ns -= 1
        cfg = dict(zip(TILE_KEYS, (bm, bn, bk, gm, nw, ns)))
        if cfg not in out:
            out.append(cfg)
    return out


def source(p: dict, nodes: list[str] | None = None) -> str:
    return codegen.render(TEMPLATE, p, nodes=nodes)


def reference(p: dict, *inputs: torch.Tensor, compute_dtype: torch.dtype = torch.float32,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """What a kernel rendered from `p` computes, in torch: every step in `compute_dtype`
    (float32, like the kernel's accumulator and epilogue), one rounding to the output dtype
    at the end. The "_a8" formats quantize the activations first, in float32 as
    `kernels/quant.py` defines it. The oracle of the tests (with float64) and a CPU fallback
    for fused nodes."""
    fmt = FORMATS[p["b_format"]]
    n_b = formats.get(p["b_format"]).operands
    cast = [t.to(compute_dtype) if t.is_floating_point() else t for t in inputs]
    a, b_ops, rest = cast[0], cast[1:1 + n_b], cast[1 + n_b:]
    bias = rest.pop(0) if p["bias"] else None
    residual = rest.pop(0) if p["residual"] else None
    w = fmt.dequant(*b_ops, group_size=p.get("group_size")).to(compute_dtype)
    if fmt.quant_a is not None:
        a = fmt.quant_a(a, *b_ops, group_size=p.get("group_size"))
    y = F.linear(a, w, bias) if p["op"] == "linear" else torch.matmul(a, w)
    y = ACTIVATIONS[p["act"]](y)
    if residual is not None:
        y = y + residual
    return y.to(out_dtype or getattr(torch, p["out_dtype"]))
