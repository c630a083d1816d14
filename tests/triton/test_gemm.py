"""GEMM kernels rendered from templates/gemm.py.j2, run under the Triton interpreter (or on a
GPU when there is one) against a float64 reference.

Tolerance: relative error (max |got - want| / max |want|) <= RTOL[dtype] from util for fp16
and bf16 (the output rounding dominates); for fp32, where the fp32 accumulation over K terms
dominates, max(RTOL[fp32], K * 2**-24).

Quantized formats (kernels/quant.py) are checked twice: against the float64 oracle
(`gemm.reference`: the weight dequantized and, for the "_a8" formats, the activations
quantized exactly as the format defines, then a float64 product) within the same `tol`, and
against the IR reference op `kernels.ops.linear(..., b_format=...)` within 2 * tol (the op
rounds the dequantized weight to x's dtype and the product before the bias: a second
rounding the kernel does not make). The activation quantization itself is checked bit for bit
(an identity weight makes the output the dequantized activations).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llm_engine.kernels import codegen, ops
from llm_engine.kernels import quant as Q
from llm_engine.kernels.dtypes import dtype_name
from llm_engine.kernels.triton import gemm
from tests.triton.util import RTOL, poison, rel_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTS = ("none", "silu", "gelu", "gelu_tanh", "relu")


def tol(dtype: torch.dtype, K: int) -> float:
    return max(RTOL[dtype], K * 2.0**-24) if dtype == torch.float32 else RTOL[dtype]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer launch() allocates starts as NaN (-12345 for ints): an element a kernel
    fails to write fails the comparison."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        return poison(empty(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", poisoned)


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def shapes_of(*ts):
    return [tuple(t.shape) for t in ts]


def dtypes_of(*ts):
    return [dtype_name(t.dtype) for t in ts]


def kernel(op, attrs, inputs, out_dtype, **override):
    p = gemm.params(op, attrs, shapes_of(*inputs), dtypes_of(*inputs), out_dtype)
    assert p is not None, (op, attrs, shapes_of(*inputs), dtypes_of(*inputs))
    p.update(override)
    return p, codegen.load_kernel(gemm.source(p, nodes=["n0"]))


def ref64(p, *inputs):
    """The float64 oracle: dequantized weight, linear/matmul, bias, activation, residual."""
    return gemm.reference(p, *inputs, compute_dtype=torch.float64, out_dtype=torch.float64)


def check(p, mod, inputs):
    got = mod.launch(*inputs)
    want = ref64(p, *inputs)
    assert got.shape == want.shape and got.dtype == getattr(torch, p["out_dtype"])
    assert not got.isnan().any()
    err = rel_error(got, want)
    assert err <= tol(got.dtype, p["K"]), f"rel error {err:.3g} for {p}"
    return got


# ----------------------------------------------------------------------------- linear

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 72, 100), (3, 130, 200), (37, 100, 72), (37, 130, 130)])
def test_linear(M, N, K, dtype, device):
    torch.manual_seed(M * 1000 + N + K)
    x, w = rand(M, K, dtype=dtype, device=device), rand(N, K, dtype=dtype, device=device)
    p, mod = kernel("linear", {}, [x, w], dtype_name(dtype))
    assert (p["bias"], p["act"], p["residual"], p["b_format"]) == (False, "none", False, "dense")
    got = check(p, mod, [x, w])
    # and against the IR reference op itself (computed in the same dtype)
    assert rel_error(got, ops.linear(x.float(), w.float())) <= 2 * tol(dtype, K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_bias_leading_dims_and_strides(dtype, device):
    torch.manual_seed(1)
    x = rand(2, 3, 5, 100, dtype=dtype, device=device)[:, :, 1:4]  # 18 rows, leading dims
    w = rand(100, 72, dtype=dtype, device=device).t()  # [72, 100], not contiguous
    b = rand(72, dtype=dtype, device=device)
    p, mod = kernel("linear", {}, [x, w, b], dtype_name(dtype))
    assert p["bias"]
    got = check(p, mod, [x, w, b])
    assert got.shape == (2, 3, 3, 72)


def test_linear_no_bias_kernel_takes_b_none(device):
    x, w = rand(3, 72, device=device), rand(100, 72, device=device)
    _, mod = kernel("linear", {}, [x, w], "float32")
    torch.testing.assert_close(mod.launch(x, w, None), mod.launch(x, w))
    with pytest.raises(ValueError, match="without a bias"):
        mod.launch(x, w, torch.zeros(100, device=device))
    with pytest.raises(ValueError):
        mod.launch(x.half(), w.half())


def test_zero_rows(device):
    x, w = rand(0, 72, device=device), rand(100, 72, device=device)
    _, mod = kernel("linear", {}, [x, w], "float32")
    assert mod.launch(x, w).shape == (0, 100)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_epilogue(act, dtype, device):
    torch.manual_seed(len(act))
    M, N, K = 37, 72, 100
    x, w = rand(M, K, dtype=dtype, device=device), rand(N, K, dtype=dtype, device=device)
    b, r = rand(N, dtype=dtype, device=device), rand(M, N, dtype=dtype, device=device)
    attrs = {"epilogue": {"act": act, "residual": True}}
    p, mod = kernel("linear", attrs, [x, w, b, r], dtype_name(dtype))
    assert (p["bias"], p["act"], p["residual"]) == (True, act, True)
    check(p, mod, [x, w, b, r])
    # residual without bias: inputs x, w, residual
    p, mod = kernel("linear", attrs, [x, w, r], dtype_name(dtype))
    assert (p["bias"], p["residual"]) == (False, True)
    check(p, mod, [x, w, r])
    # activation only, against the torch activation the op set uses
    p, mod = kernel("linear", {"epilogue": {"act": act}}, [x, w, b], dtype_name(dtype))
    got = mod.launch(x, w, b)
    want = F.linear(x.double(), w.double(), b.double())
    want = want if act == "none" else ops._ACTS[act](want)
    assert rel_error(got, want) <= tol(dtype, K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_epilogue_fp16_variants(dtype, device):
    """Every activation once more in each dtype, on a decode-sized M."""
    torch.manual_seed(7)
    x, w = rand(3, 130, dtype=dtype, device=device), rand(100, 130, dtype=dtype, device=device)
    r = rand(3, 100, dtype=dtype, device=device)
    for act in ("silu", "gelu_tanh"):
        p, mod = kernel("linear", {"epilogue": {"act": act, "residual": True}}, [x, w, r],
                        dtype_name(dtype))
        check(p, mod, [x, w, r])


# ----------------------------------------------------------------------------- tilings

@pytest.mark.parametrize("device_kind", ["cpu", "cuda"])
def test_configs(device_kind, device):
    """Every candidate tiling (CPU and CUDA lists) computes the same thing; includes tiles
    larger than the problem, several GROUP_M groups and BLOCK_K > K."""
    torch.manual_seed(3)
    M, N, K = 37, 130, 100
    x, w = rand(M, K, dtype=torch.float16, device=device), rand(N, K, dtype=torch.float16,
                                                                 device=device)
    b = rand(N, dtype=torch.float16, device=device)
    cfgs = gemm.configs(M, N, K, device_kind) + gemm.configs(1, N, K, device_kind)
    for cfg in cfgs:
        assert set(cfg) == set(gemm.TILE_KEYS)
        assert min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) >= 16
        p, mod = kernel("linear", {"epilogue": {"act": "relu"}}, [x, w, b], "float16", **cfg)
        check(p, mod, [x, w, b])


def test_small_tiles_many_groups(device):
    """16x16x16 tiles, GROUP_M=2: 3 row tiles x 9 column tiles, ragged at every edge."""
    torch.manual_seed(4)
    x, w = rand(37, 72, device=device), rand(130, 72, device=device)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
    p, mod = kernel("linear", {}, [x, w], "float32", **cfg)
    check(p, mod, [x, w])


# ----------------------------------------------------------------------------- matmul

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul(dtype, device):
    torch.manual_seed(5)
    a, b = rand(2, 3, 100, dtype=dtype, device=device), rand(100, 72, dtype=dtype, device=device)
    p, mod = kernel("matmul", {}, [a, b], dtype_name(dtype))
    assert not p["batched"]
    got = check(p, mod, [a, b])
    assert rel_error(got, ops.matmul(a.double(), b.double())) <= tol(dtype, 100)
    # batched, with a transposed (non-contiguous) b as in q @ k^T
    a = rand(2, 3, 37, 72, dtype=dtype, device=device)
    b = rand(2, 3, 100, 72, dtype=dtype, device=device).transpose(-1, -2)
    p, mod = kernel("matmul", {}, [a, b], dtype_name(dtype))
    assert p["batched"]
    got = check(p, mod, [a, b])
    assert got.shape == (2, 3, 37, 100)


def test_matmul_vector_and_residual(device):
    torch.manual_seed(6)
    a, b = rand(100, device=device), rand(100, 72, device=device)
    p, mod = kernel("matmul", {}, [a, b], "float32")
    assert check(p, mod, [a, b]).shape == (72,)
    a = rand(4, 9, 130, device=device)
    b, r = rand(4, 130, 72, device=device), rand(4, 9, 72, device=device)
    p, mod = kernel("matmul", {"epilogue": {"act": "gelu", "residual": True}}, [a, b, r],
                    "float32")
    check(p, mod, [a, b, r])


# ----------------------------------------------------------------------------- int8 prologue

def quantize_int8_channel(w: torch.Tensor):
    scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 72, 100), (37, 130, 72)])
def test_int8_channel(M, N, K, dtype, device):
    torch.manual_seed(M + N + K)
    x = rand(M, K, dtype=dtype, device=device)
    q, scale = quantize_int8_channel(rand(N, K, device=device, scale=0.05))
    b = rand(N, dtype=dtype, device=device)
    attrs = {"b_format": "int8_channel", "epilogue": {"act": "silu"}}
    p, mod = kernel("linear", attrs, [x, q, scale, b], dtype_name(dtype))
    assert p["b_format"] == "int8_channel"
    got = mod.launch(x, q, scale, b)
    want = F.silu(F.linear(x.double(), (q.double() * scale.double()[:, None]), b.double()))
    assert got.dtype == dtype and not got.isnan().any()
    assert rel_error(got, want) <= tol(dtype, K)
    # and the plain (no-epilogue) int8 linear
    p, mod = kernel("linear", {"b_format": "int8_channel"}, [x, q, scale], dtype_name(dtype))
    want = F.linear(x.double(), q.double() * scale.double()[:, None])
    assert rel_error(mod.launch(x, q, scale), want) <= tol(dtype, K)


# ----------------------------------------------------------------------------- int4 / W8A8

QUANT_FORMATS = ("int4_group", "int8_channel_a8", "fp8_channel_a8", "fp8_channel_a8_token",
                 "fp8_channel_a8_group")
needs_fp8 = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8_e4m3fn")


def quantized(b_format: str, x: torch.Tensor, N: int, K: int, G: int | None = None,
              seed: int = 0, uint8_zeros: bool = False):
    """(weight operands, node attrs, ops.linear kwargs) of a random [N, K] weight stored as
    `b_format`; fp8's static x_scale comes from x (as a calibration would), at 0.8 of the
    range so some values saturate. `uint8_zeros`: int4 with integer zero points stored as
    uint8, as engines from before float zero points have them."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=gen) * 0.05).to(x.device)
    w[0, :] = 0.0  # a zero row: scale 1, q 0
    attrs: dict = {"b_format": b_format}
    if b_format == "int4_group":
        ws = list(Q.quantize_int4_group(w, G))
        if uint8_zeros:
            ws[2] = ws[2].round().to(torch.uint8)
        attrs["group_size"] = G
    elif b_format == "int8_channel_a8":
        ws = list(Q.quantize_int8_channel(w))
    elif b_format == "fp8_channel_a8_token":
        ws = list(Q.quantize_fp8_channel(w))
    elif b_format == "fp8_channel_a8_group":
        ws = list(Q.quantize_fp8_channel(w))
        attrs["group_size"] = G
    else:
        x_scale = (x.float().abs().amax() / Q.FP8_E4M3_MAX / 0.8).reshape(1)
        ws = [*Q.quantize_fp8_channel(w), x_scale]
    return ws, attrs, {"b_format": b_format, "group_size": attrs.get("group_size")}


def activations(M, K, dtype, device, seed):
    """Rows at different magnitudes (per-token scales differ), one all-zero row when M > 2."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * torch.logspace(-2, 1, M)[:, None]
    if M > 2:
        x[1] = 0.0
    return x.to(device=device, dtype=dtype)


def check_quantized(b_format, M, N, K, dtype, device, *, G=None, bias=True, act="none",
                    seed=0, uint8_zeros=False, **cfg):
    x = activations(M, K, dtype, device, seed)
    ws, attrs, op_kw = quantized(b_format, x, N, K, G, seed, uint8_zeros)
    b = rand(N, dtype=dtype, device=device) if bias else None
    if act != "none":
        attrs["epilogue"] = {"act": act}
    inputs = [x, *ws] + ([b] if bias else [])
    p, mod = kernel("linear", attrs, inputs, dtype_name(dtype), **cfg)
    assert p["b_format"] == b_format and p["bias"] == bias
    assert p.get("group_size") == op_kw["group_size"]
    got = check(p, mod, inputs)  # the float64 oracle, within tol
    want = ops.linear(x, *ws, *([b] if bias else []), **op_kw)
    want = want if act == "none" else ops._ACTS[act](want.float())
    err = rel_error(got, want)
    assert err <= 2 * tol(dtype, K), f"rel error {err:.3g} against ops.linear for {p}"
    return p, mod, inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,G,cfg", [
    (1, 72, 96, 32, {}),  # BLOCK_K 64 spans two groups; K ragged (96 = 1.5 tiles)
    (5, 100, 256, 64, {}),  # BLOCK_K 64 = G: one group per tile
    (37, 130, 384, 128, {}),  # two tiles per group, N ragged, several row tiles
    (3, 40, 192, 64, {"BLOCK_K": 128}),  # K not a multiple of the tile, tiles straddle groups
    (2, 24, 160, 32, {"BLOCK_K": 16, "BLOCK_N": 16}),  # four tiles per group
])
def test_int4_group(M, N, K, G, cfg, dtype, device):
    p, _, inputs = check_quantized("int4_group", M, N, K, dtype, device, G=G, seed=M + N + K,
                                   **cfg)
    assert p["zero_dtype"] == "float32" and inputs[3].dtype == torch.float32
    assert not torch.equal(inputs[3], inputs[3].round())  # the zero points are not integers


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,G,cfg", [
    (5, 100, 256, 64, {}),  # one group per tile: one zero point per column
    (3, 40, 192, 64, {"BLOCK_K": 128}),  # tiles straddle groups: a zero point per element
])
def test_int4_group_uint8_zeros(M, N, K, G, cfg, dtype, device):
    """Engines built before float zero points store integer ones as uint8: their params have
    no zero_dtype, and their kernel still computes (q - zero) * scale."""
    p, _, inputs = check_quantized("int4_group", M, N, K, dtype, device, G=G, seed=M + N + K,
                                   uint8_zeros=True, **cfg)
    assert "zero_dtype" not in p and inputs[3].dtype == torch.uint8


@pytest.mark.parametrize("b_format", ["int8_channel_a8",
                                      pytest.param("fp8_channel_a8", marks=needs_fp8),
                                      pytest.param("fp8_channel_a8_token", marks=needs_fp8)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 72, 100), (37, 130, 200)])
def test_w8a8(b_format, M, N, K, dtype, device):
    check_quantized(b_format, M, N, K, dtype, device, seed=M * N + K)


@needs_fp8
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,G", [
    (1, 72, 128, 32),  # four groups, one K tile each
    (37, 130, 192, 64),  # several row tiles, N ragged
    (5, 40, 256, 128),
])
def test_fp8_group(M, N, K, G, dtype, device):
    p, _, _ = check_quantized("fp8_channel_a8_group", M, N, K, dtype, device, G=G,
                              seed=M * N + K)
    assert p["BLOCK_K"] == G


@pytest.mark.parametrize("b_format", ["int4_group", "int8_channel_a8",
                                      pytest.param("fp8_channel_a8", marks=needs_fp8),
                                      pytest.param("fp8_channel_a8_token", marks=needs_fp8),
                                      pytest.param("fp8_channel_a8_group", marks=needs_fp8)])
def test_quantized_without_bias_with_epilogue(b_format, device):
    check_quantized(b_format, 3, 72, 128, torch.bfloat16, device, G=64, bias=False, act="silu")
    x = activations(3, 128, torch.float16, device, 1)
    ws, attrs, _ = quantized(b_format, x, 72, 128, 64)
    r = rand(3, 72, dtype=torch.float16, device=device)
    attrs["epilogue"] = {"act": "gelu", "residual": True}
    p, mod = kernel("linear", attrs, [x, *ws, r], "float16")
    check(p, mod, [x, *ws, r])


@pytest.mark.parametrize("b_format", ["int4_group", "int8_channel_a8",
                                      pytest.param("fp8_channel_a8", marks=needs_fp8),
                                      pytest.param("fp8_channel_a8_token", marks=needs_fp8),
                                      pytest.param("fp8_channel_a8_group", marks=needs_fp8)])
def test_quantized_tilings(b_format, device):
    """Every CPU and CUDA candidate tiling of the formats' `configs` computes the same."""
    M, N, K = 37, 72, 192
    x = activations(M, K, torch.float16, device, 2)
    ws, attrs, _ = quantized(b_format, x, N, K, 64)
    inputs = [x, *ws]
    cfgs = gemm.configs(M, N, K, "cpu", b_format=b_format, group_size=64) + \
        gemm.configs(1, N, K, "cuda", b_format=b_format, group_size=64)
    for cfg in cfgs:
        if b_format in gemm.EIGHT_BIT_DOT:
            assert cfg["BLOCK_K"] >= 32
        if b_format in gemm.TILE_IS_GROUP:
            assert cfg["BLOCK_K"] == 64
        p, mod = kernel("linear", attrs, inputs, "float16", **cfg)
        check(p, mod, inputs)


def test_int8_a8_quantizes_activations_exactly(device):
    """With an identity weight (q = I, scale 1) the fp32 output is xq * a exactly: the kernel's
    per-row quantization is bit for bit quantize_int8_token's, ties to even included."""
    K = 72
    x = activations(5, K, torch.float32, device, 3)
    x[2, :8] = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -126.5])  # a = 1: ties
    q, scale = torch.eye(K, dtype=torch.int8, device=device), torch.ones(K, device=device)
    _, mod = kernel("linear", {"b_format": "int8_channel_a8"}, [x, q, scale], "float32",
                    BLOCK_K=32)
    xq, a = Q.quantize_int8_token(x)
    assert xq[2, :8].tolist() == [127, 2, 4, -2, -0, 0, 2, -126]
    assert torch.equal(mod.launch(x, q, scale), xq.float() * a[:, None])


@needs_fp8
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_a8_quantizes_activations_exactly(dtype, device):
    """Identity fp8 weight: the output is e4m3(clamp(x / x_scale)) * x_scale, bit for bit:
    normals, subnormals, ties to even, saturation."""
    K = 64
    special = [1.0625, 1.1875, -1.0625, 2.0**-10, 3 * 2.0**-10, -(2.0**-10), 2.0**-12,
               447.0, 464.0, 1e4, -1e4, 0.0, 300.0, -2.0**-7 * 1.0625, 15.5, 0.013]
    x = torch.cat((torch.tensor(special), torch.randn(K - len(special)) * 30)).reshape(1, K)
    x = torch.cat((x, x * 0.37, torch.randn(1, K) * 2.0**-8)).to(device=device, dtype=dtype)
    x_scale = torch.tensor([1.0], device=device)
    q = torch.eye(K, device=device).to(torch.float8_e4m3fn)
    scale = torch.ones(K, device=device)
    _, mod = kernel("linear", {"b_format": "fp8_channel_a8"}, [x, q, scale, x_scale],
                    dtype_name(dtype))
    want = Q.quantize_fp8_tensor(x, x_scale).float().to(dtype)
    assert torch.equal(mod.launch(x, q, scale, x_scale), want)
    x_scale = torch.tensor([0.37], device=device)
    want = (Q.quantize_fp8_tensor(x, x_scale).float() * 0.37).to(dtype)
    torch.testing.assert_close(mod.launch(x, q, scale, x_scale), want, rtol=0, atol=0)


@needs_fp8
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_a8_token_quantizes_activations_exactly(dtype, device):
    """Identity fp8 weight: the output is quantize_fp8_token's xq * a, bit for bit, for rows
    of very different magnitudes, an all-zero row and a row whose values tie on the grid."""
    K = 64
    x = activations(5, K, torch.float32, device, 6)
    x[3, :6] = torch.tensor([448.0, 1.0625, 1.1875, -1.0625, 2.0**-10, 3 * 2.0**-10])  # a = 1
    x = x.to(dtype)
    q = torch.eye(K, device=device).to(torch.float8_e4m3fn)
    scale = torch.ones(K, device=device)
    _, mod = kernel("linear", {"b_format": "fp8_channel_a8_token"}, [x, q, scale],
                    dtype_name(dtype))
    xq, a = Q.quantize_fp8_token(x.float())
    assert xq[3, :6].float().tolist() == [448.0, 1.0, 1.25, -1.0, 0.0, 2.0**-8]  # ties: even
    want = (xq.float() * a[:, None]).to(dtype)
    torch.testing.assert_close(mod.launch(x, q, scale), want, rtol=0, atol=0)


@needs_fp8
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_a8_group_quantizes_activations_exactly(dtype, device):
    """Identity fp8 weight: the output is quantize_fp8_token_group's xq * a, bit for bit, with
    groups of one row at very different magnitudes, an all-zero group and grid ties."""
    K, G = 128, 32
    x = activations(5, K, torch.float32, device, 7)
    x[0] *= (2.0 ** (-5 * torch.arange(K // G, device=device))).repeat_interleave(G)
    x[3, :6] = torch.tensor([448.0, 1.0625, 1.1875, -1.0625, 2.0**-10, 3 * 2.0**-10])  # a = 1
    x[3, 6:G] = 0.5
    x[4, G:2 * G] = 0.0
    x = x.to(dtype)
    q = torch.eye(K, device=device).to(torch.float8_e4m3fn)
    scale = torch.ones(K, device=device)
    _, mod = kernel("linear", {"b_format": "fp8_channel_a8_group", "group_size": G},
                    [x, q, scale], dtype_name(dtype))
    xq, a = Q.quantize_fp8_token_group(x.float(), G)
    assert xq[3, :6].float().tolist() == [448.0, 1.0, 1.25, -1.0, 0.0, 2.0**-8]  # ties: even
    want = (xq.float().reshape(5, K // G, G) * a[..., None]).reshape(5, K).to(dtype)
    torch.testing.assert_close(mod.launch(x, q, scale), want, rtol=0, atol=0)


@pytest.mark.parametrize("b_format", ["int4_group", "int8_channel_a8",
                                      pytest.param("fp8_channel_a8", marks=needs_fp8),
                                      pytest.param("fp8_channel_a8_token", marks=needs_fp8),
                                      pytest.param("fp8_channel_a8_group", marks=needs_fp8)])
def test_autotune_operands_fit_the_format(b_format, device):
    """builder.autotune times a format's kernel on operands the format's checker accepts."""
    from llm_engine.builder import autotune

    x = activations(3, 128, torch.float16, device, 5)
    ws, attrs, _ = quantized(b_format, x, 48, 128, 32)
    p, mod = kernel("linear", attrs, [x, *ws], "float16")
    made = autotune.weight_operands(p, device)
    assert shapes_of(*made) == shapes_of(*ws) and dtypes_of(*made) == dtypes_of(*ws)
    assert not mod.launch(x, *made).isnan().any()
    assert all(c["BLOCK_K"] >= (32 if b_format in gemm.EIGHT_BIT_DOT else 16)
               for c in autotune.candidates(p))
    if b_format in gemm.TILE_IS_GROUP:
        assert {c["BLOCK_K"] for c in autotune.candidates(p)} == {32}


def test_quantized_launch_checks(device):
    x = activations(2, 64, torch.float32, device, 4)
    ws, attrs, _ = quantized("int4_group", x, 16, 64, 32)
    _, mod = kernel("linear", attrs, [x, *ws], "float32")
    assert mod.launch(x, *ws, group_size=32).shape == (2, 16)
    with pytest.raises(ValueError, match="group size 32"):
        mod.launch(x, *ws, group_size=64)
    with pytest.raises(ValueError, match=r"int4_group, w \(16, 32\)"):
        mod.launch(x, torch.zeros(16, 64, dtype=torch.uint8, device=device), *ws[1:])
    assert mod.launch(x[:0], *ws).shape == (0, 16)
    ws, attrs, _ = quantized("int8_channel_a8", x, 16, 64)
    _, mod = kernel("linear", attrs, [x, *ws], "float32")
    assert mod.launch(x[:0], *ws).shape == (0, 16)
    if hasattr(torch, "float8_e4m3fn"):
        ws_g, attrs_g, _ = quantized("fp8_channel_a8_group", x, 16, 64, 32)
        _, mod_g = kernel("linear", attrs_g, [x, *ws_g], "float32")
        with pytest.raises(ValueError, match="fp8 group kernel rendered for group size 32"):
            mod_g.launch(x, *ws_g, group_size=64)
    with pytest.raises(ValueError, match="without a bias"):
        mod.launch(x, *ws, torch.zeros(16, device=device))


# ----------------------------------------------------------------------------- the checker

def test_params_checker():
    P = gemm.params
    f16 = "float16"
    ok = P("linear", {}, [("T", 64), (96, 64)], [f16, f16], f16)
    assert ok is not None and (ok["N"], ok["K"], ok["op"]) == (96, 64, "linear")
    assert set(gemm.TILE_KEYS) <= set(ok)
    assert P("linear", {}, [(2, "T", 64), (96, 64), (96,)], [f16] * 3, f16)["bias"]
    # what it refuses: the builder keeps the reference op
    assert P("linear", {}, [(4, 64), (96, 64)], [f16, "float32"], f16) is None  # mixed
    assert P("linear", {}, [(4, 64), (96, 64)], [f16, f16], "float32") is None
    assert P("linear", {}, [(4, "T"), (96, "T")], [f16, f16], f16) is None  # symbolic K
    assert P("linear", {}, [(4, 64), (96, 32)], [f16, f16], f16) is None  # K mismatch
    assert P("linear", {}, [(4, 64), (96, 64), (95,)], [f16] * 3, f16) is None
    assert P("linear", {"foo": 1}, [(4, 64), (96, 64)], [f16, f16], f16) is None
    assert P("linear", {"epilogue": {"act": "tanh"}}, [(4, 64), (96, 64)], [f16] * 2,
             f16) is None
    assert P("linear", {"epilogue": {"act": "silu", "scale": 2}}, [(4, 64), (96, 64)],
             [f16] * 2, f16) is None
    assert P("linear", {"epilogue": {"residual": True}}, [(4, 64), (96, 64)], [f16] * 2,
             f16) is None  # the residual input is missing
    assert P("linear", {"epilogue": {"residual": True}}, [(4, 64), (96, 64), (4, 95)],
             [f16] * 3, f16) is None  # residual shape
    assert P("linear", {}, [(4, 64), (96, 64)], ["int8", "int8"], "int8") is None
    assert P("linear", {"b_format": "int4_group"}, [(4, 64), (96, 64)], [f16] * 2, f16) is None
    assert P("linear", {"b_format": "int2"}, [(4, 64), (96, 64)], [f16] * 2, f16) is None
    assert P("linear", {"b_format": "int8_channel"}, [(4, 64), (96, 64)], [f16, "int8"],
             f16) is None  # no scale
    assert P("linear", {"b_format": "int8_channel"}, [(4, 64), (96, 64), (96,)],
             [f16, "int8", "float32"], f16)["b_format"] == "int8_channel"
    # int4_group: packed [N, K/2] uint8, scales and zeros fp32 [N, K/G] (zeros uint8 in
    # engines from before float zero points), attr group_size
    i4 = [(4, 64), (96, 32), (96, 2), (96, 2)]
    i4d = [f16, "uint8", "float32", "uint8"]
    g32 = {"b_format": "int4_group", "group_size": 32}
    assert P("linear", g32, i4, i4d, f16)["group_size"] == 32
    assert "zero_dtype" not in P("linear", g32, i4, i4d, f16)
    assert P("linear", g32, i4, [*i4d[:3], "float32"], f16)["zero_dtype"] == "float32"
    assert P("linear", g32, i4, [*i4d[:3], "float16"], f16) is None
    assert P("linear", g32, [*i4, (96,)], [*i4d, f16], f16)["bias"]
    assert P("linear", {**g32, "group_size": 16}, i4, i4d, f16) is None  # K/G mismatch
    assert P("linear", {**g32, "group_size": 24}, [(4, 48), (96, 24), (96, 2), (96, 2)], i4d,
             f16)["group_size"] == 24  # any G dividing K
    assert P("linear", {**g32, "group_size": 0}, i4, i4d, f16) is None
    assert P("linear", {**g32, "group_size": True}, i4, i4d, f16) is None
    assert P("linear", {"b_format": "int4_group"}, i4, i4d, f16) is None  # no group_size
    assert P("linear", {"group_size": 32}, [(4, 64), (96, 64)], [f16] * 2, f16) is None
    assert P("linear", {**g32, "group_size": 7}, [(4, 7), (96, 3), (96, 1), (96, 1)], i4d,
             f16) is None  # odd K
    assert P("linear", g32, [(4, 64), (96, 64), (96, 2), (96, 2)], i4d, f16) is None  # unpacked
    assert P("linear", g32, i4, [f16, "int8", "float32", "uint8"], f16) is None
    assert P("linear", g32, i4, [f16, "uint8", "float16", "uint8"], f16) is None
    assert P("matmul", g32, [(4, 64), (64, 96)], [f16] * 2, f16) is None
    # W8A8
    a8 = {"b_format": "int8_channel_a8"}
    assert P("linear", a8, [(4, 64), (96, 64), (96,)], [f16, "int8", "float32"],
             f16)["b_format"] == "int8_channel_a8"
    assert P("linear", a8, [(4, 64), (96, 64), (96,)], [f16, "uint8", "float32"], f16) is None
    fp8 = {"b_format": "fp8_channel_a8"}
    fp8_in = [(4, 64), (96, 64), (96,), (1,)]
    fp8_d = [f16, "float8_e4m3fn", "float32", "float32"]
    assert P("linear", fp8, fp8_in, fp8_d, f16)["b_format"] == "fp8_channel_a8"
    assert P("linear", fp8, [*fp8_in, (96,)], [*fp8_d, f16], f16)["bias"]
    assert P("linear", fp8, fp8_in[:3], fp8_d[:3], f16) is None  # no x_scale
    assert P("linear", fp8, [*fp8_in[:3], (96,)], fp8_d, f16) is None  # x_scale per channel
    assert P("linear", fp8, fp8_in, [f16, "int8", "float32", "float32"], f16) is None
    for fmt in gemm.EIGHT_BIT_DOT:  # an 8-bit tensor-core dot needs K >= 32 per tile
        for dev in ("cpu", "cuda"):
            assert all(c["BLOCK_K"] >= 32 for c in gemm.configs(None, 96, 8, dev, b_format=fmt,
                                                                 group_size=32))
    # fp8 per-token-group: a power-of-two group >= 16 dividing K, given as the node attribute
    grp, grp_d = [(4, 64), (96, 64), (96,)], [f16, "float8_e4m3fn", "float32"]
    p = P("linear", {"b_format": "fp8_channel_a8_group", "group_size": 32}, grp, grp_d, f16)
    assert p["group_size"] == 32 and p["BLOCK_K"] == 32
    for g in (None, 24, 128, 16):  # missing, not a power of two, not dividing K, too small
        attrs = {"b_format": "fp8_channel_a8_group", **({"group_size": g} if g else {})}
        assert P("linear", attrs, grp, grp_d, f16) is None, g
    assert P("linear", {"b_format": "fp8_channel_a8_token", "group_size": 32}, grp, grp_d,
             f16) is None  # per-token takes no group
    with pytest.raises(ValueError, match="need the group size"):
        gemm.configs(1, 96, 64, b_format="fp8_channel_a8_group")
    with pytest.raises(codegen.TemplateError):  # a tiling whose K tile is not the group
        gemm.source({**p, "BLOCK_K": 16})
    assert P("matmul", {}, [(4, 64), (64, 96)], [f16] * 2, f16)["op"] == "matmul"
    assert P("matmul", {}, [(4, 64), (64, 96), (96,)], [f16] * 3, f16) is None  # no bias
    assert P("matmul", {}, [(2, 4, 64), (3, 64, 96)], [f16] * 2, f16) is None  # broadcast
    assert P("matmul", {}, [(2, "T", 64), (2, 64, "T")], [f16] * 2, f16) is None
    assert P("embedding", {}, [(96, 64), (4,)], [f16, "int64"], f16) is None


def test_render_is_deterministic_and_named():
    p = gemm.params("linear", {"epilogue": {"act": "gelu", "residual": True}},
                    [(8, 64), (96, 64), (96,), (8, 96)], ["bfloat16"] * 4, "bfloat16")
    src = gemm.source(p, nodes=["mlp.fc1"])
    assert src == gemm.source(dict(reversed(list(p.items()))), nodes=["mlp.fc1"])
    assert src.startswith("# Generated by llm-engine from templates/gemm.py.j2")
    assert "# implements: mlp.fc1" in src and "def launch(x, w, b, residual, **attrs)" in src
    with pytest.raises(codegen.TemplateError):
        codegen.render("gemm", {**p, "b_format": "int4_group"})  # without its group_size


# ----------------------------------------------------------------------------- GPU compile

_AOT = r"""
import importlib.util, json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
out = []
for job in json.loads(sys.stdin.read()):
    spec = importlib.util.spec_from_file_location("aot_" + job["kernel"], job["path"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = getattr(mod, job["kernel"])
    types = iter(job["types"])
    sig = {n: "constexpr" if n in job["constexprs"] else next(types) for n in fn.arg_names}
    for arch in job["archs"]:
        k = compile(ASTSource(fn, sig, job["constexprs"]), target=GPUTarget("cuda", arch, 32),
                    options=job["options"])
        out.append({"arch": arch, "ptx": k.asm["ptx"]})
print(json.dumps(out))
"""


def gpu_job(src: str, *inputs, archs=(90,)) -> dict:
    """Run launch() for `inputs` with the kernel replaced by a recorder: the argument types,
    constexprs and launch options the real launch would compile the kernel with."""
    mod = codegen.load_kernel(src)
    names = [n for n in vars(mod) if n.endswith("_kernel")]
    assert len(names) == 1, names
    real, calls = getattr(mod, names[0]), []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((args, kwargs))

    setattr(mod, names[0], Recorder())
    try:
        mod.launch(*inputs)
    finally:
        setattr(mod, names[0], real)
    args, kwargs = calls[0]
    tensor_types = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                    torch.int8: "*i8", torch.uint8: "*u8", torch.int32: "*i32",
                    torch.int64: "*i64"}
    if hasattr(torch, "float8_e4m3fn"):
        tensor_types[torch.float8_e4m3fn] = "*fp8e4nv"
    options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages", 3)}
    if "UPCAST" in kwargs:
        kwargs["UPCAST"] = False  # as on a GPU
    types = [tensor_types[v.dtype] if torch.is_tensor(v) else "i1" if isinstance(v, bool)
             else "i32" if isinstance(v, int) else "fp32" for v in args]
    return {"path": str(codegen._cache_dir() / f"{codegen.kernel_name(src)}.py"),
            "kernel": names[0], "types": types, "constexprs": kwargs, "options": options,
            "archs": list(archs)}


def compile_for_gpu(jobs: list[dict]) -> list[str]:
    """Compile kernels for NVIDIA GPUs without one (Triton ships ptxas), in a fresh process:
    here the interpreter is on, and it replaced triton.language's own jit functions. Catches
    what the interpreter lets through (loop-carried types, constexpr misuse, layouts).
    Returns the PTX of each (job, arch)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _AOT], input=json.dumps(jobs), env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    return [r["ptx"] for r in json.loads(out.stdout)]


def test_compiles_for_gpu():
    """The fused bf16 kernel with the int8 prologue compiles for sm_90."""
    x = rand(5, 100, dtype=torch.bfloat16)
    q, scale = quantize_int8_channel(rand(72, 100))
    b, r = rand(72, dtype=torch.bfloat16), rand(5, 72, dtype=torch.bfloat16)
    attrs = {"b_format": "int8_channel", "epilogue": {"act": "gelu_tanh", "residual": True}}
    p = gemm.params("linear", attrs, shapes_of(x, q, scale, b, r), dtypes_of(x, q, scale, b, r),
                    "bfloat16")
    p.update(gemm.configs(5, 72, 100, "cuda")[0])
    (ptx,) = compile_for_gpu([gpu_job(gemm.source(p), x, q, scale, b, r)])
    assert "mma.sync" in ptx or "wgmma" in ptx


def quantized_gpu_jobs(M_hint, dtype=torch.bfloat16, *, first_only=False,
                       archs=(80, 90)) -> list[dict]:
    """Compile jobs for the int4 and W8A8 kernels (fused bf16 epilogue). The first tiling of
    each goes to every arch in `archs`, the others to sm_90 only; fp8 always to sm_90 only
    (e4m3 needs sm_89+). int4 with G=32 (tiles span groups) and, unless `first_only`, G=128
    (the CUDA tiles, BLOCK_K <= 128, lie in one group)."""
    N, K = 130, 256
    x, b = rand(5, K, dtype=dtype), rand(N, dtype=dtype)
    jobs = []
    for b_format, G in (("int4_group", 128), ("int4_group", 32), ("int8_channel_a8", None),
                        ("fp8_channel_a8", None), ("fp8_channel_a8_token", None),
                        ("fp8_channel_a8_group", 64)):
        if b_format.startswith("fp8") and not hasattr(torch, "float8_e4m3fn"):
            continue
        if first_only and G == 128:  # the one-group-per-tile path: left to the sweep
            continue
        ws, attrs, _ = quantized(b_format, x, N, K, G)
        attrs["epilogue"] = {"act": "silu"}
        inputs = [x, *ws, b]
        base = gemm.params("linear", attrs, shapes_of(*inputs), dtypes_of(*inputs),
                           dtype_name(dtype))
        cfgs = gemm.configs(M_hint, N, K, "cuda", b_format=b_format, group_size=G)
        for i, cfg in enumerate(cfgs[:1] if first_only else cfgs):
            arch = (90,) if b_format.startswith("fp8") or i else archs
            jobs.append(gpu_job(gemm.source({**base, **cfg}), *inputs, archs=arch))
    return jobs


def test_quantized_compile_for_gpu():
    """int4_group, int8_channel_a8 (an int8 MMA) and fp8_channel_a8 (the native fp8 cast and
    dot, not the interpreter's fp32 path) compile for sm_90 and use its tensor cores."""
    jobs = quantized_gpu_jobs(1, first_only=True, archs=(90,))
    ptxs = compile_for_gpu(jobs)
    assert len(ptxs) == len(jobs)
    for job, ptx in zip(jobs, ptxs):
        assert "mma" in ptx, job["types"]
        if "*i8" in job["types"]:
            assert ".s8.s8.s32" in ptx  # int8 x int8 -> int32
        if "*fp8e4nv" in job["types"]:
            assert "cvt.rn.satfinite.e4m3x2.f32" in ptx  # A quantized on the GPU


# ----------------------------------------------------------------------------- slow sweeps

@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 16, 37, 100])
@pytest.mark.parametrize("N,K", [(72, 100), (100, 72), (130, 200), (64, 128), (200, 130)])
def test_linear_sweep(M, N, K, dtype, device):
    torch.manual_seed(M + N * K)
    x, w = rand(M, K, dtype=dtype, device=device), rand(N, K, dtype=dtype, device=device)
    b, r = rand(N, dtype=dtype, device=device), rand(M, N, dtype=dtype, device=device)
    for attrs, inputs in (({}, [x, w]), ({}, [x, w, b]),
                          ({"epilogue": {"act": "silu", "residual": True}}, [x, w, b, r])):
        for cfg in gemm.configs(M, N, K, device)[:2]:
            p, mod = kernel("linear", attrs, inputs, dtype_name(dtype), **cfg)
            check(p, mod, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("b_format", ["dense", "int8_channel"])
def test_epilogue_format_sweep(act, b_format, dtype, device):
    torch.manual_seed(11)
    M, N, K = 37, 130, 200
    x = rand(M, K, dtype=dtype, device=device)
    if b_format == "dense":
        ws = [rand(N, K, dtype=dtype, device=device)]
    else:
        ws = list(quantize_int8_channel(rand(N, K, device=device, scale=0.05)))
    b, r = rand(N, dtype=dtype, device=device), rand(M, N, dtype=dtype, device=device)
    for residual in (False, True):
        for bias in (False, True):
            inputs = [x, *ws] + ([b] if bias else []) + ([r] if residual else [])
            attrs = {"b_format": b_format, "epilogue": {"act": act, "residual": residual}}
            p, mod = kernel("linear", attrs, inputs, dtype_name(dtype))
            check(p, mod, inputs)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves")
@pytest.mark.parametrize("M_hint", [1, 37, None])
def test_compile_sweep(M_hint):
    """Every CUDA candidate tiling compiles for sm_90 (bf16 fused epilogue and the int8
    prologue); the first tiling of each dtype also for sm_80."""
    N, K = 130, 200
    jobs = []
    for dtype in DTYPES:
        x, w = rand(5, K, dtype=dtype), rand(N, K, dtype=dtype)
        q, scale = quantize_int8_channel(rand(N, K))
        b, r = rand(N, dtype=dtype), rand(5, N, dtype=dtype)
        for inputs, attrs in (([x, w, b, r], {"epilogue": {"act": "gelu", "residual": True}}),
                              ([x, q, scale], {"b_format": "int8_channel"})):
            base = gemm.params("linear", attrs, shapes_of(*inputs), dtypes_of(*inputs),
                               dtype_name(dtype))
            for i, cfg in enumerate(gemm.configs(M_hint, N, K, "cuda")):
                if dtype == torch.bfloat16 or i == 0:
                    archs = (80, 90) if i == 0 else (90,)
                    jobs.append(gpu_job(gemm.source({**base, **cfg}), *inputs, archs=archs))
    a, bm = rand(2, 3, 37, 64), rand(2, 3, 64, 100)
    p = gemm.params("matmul", {}, shapes_of(a, bm), dtypes_of(a, bm), "float32")
    jobs.append(gpu_job(gemm.source(p), a, bm, archs=(80, 90)))
    assert len(compile_for_gpu(jobs)) == sum(len(j["archs"]) for j in jobs)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves")
@pytest.mark.parametrize("M_hint", [1, 37, None])
def test_quantized_compile_sweep(M_hint):
    """Every CUDA candidate tiling of the int4 / W8A8 formats compiles for sm_90 (the first
    also for sm_80, fp8 excepted); large tiles take Hopper's wgmma, fp8 with e4m3 operands."""
    jobs = quantized_gpu_jobs(M_hint)
    ptxs = compile_for_gpu(jobs)
    assert len(ptxs) == sum(len(j["archs"]) for j in jobs)
    if M_hint is None and hasattr(torch, "float8_e4m3fn"):
        per_arch = [j for j in jobs for _ in j["archs"]]  # compile_for_gpu's order
        fp8 = [p for j, p in zip(per_arch, ptxs) if "*fp8e4nv" in j["types"]]
        assert any("wgmma" in p and "e4m3" in p for p in fp8)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 16, 37])
@pytest.mark.parametrize("N,K,G", [(72, 96, 32), (130, 256, 64), (64, 384, 128),
                                   (100, 192, 64), (48, 160, 32)])
def test_quantized_sweep(M, N, K, G, dtype, device):
    for b_format in QUANT_FORMATS:
        if b_format.startswith("fp8") and not hasattr(torch, "float8_e4m3fn"):
            continue
        for cfg in gemm.configs(M, N, K, device, b_format=b_format, group_size=G)[:2]:
            check_quantized(b_format, M, N, K, dtype, device, G=G, seed=M + N + K, **cfg)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
