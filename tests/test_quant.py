"""kernels/quant.py: round-trip error bounds, int4 packing layout, group-size resolution and the
CPU linear paths against dequantize + F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import quant as Q

torch.set_num_threads(1)

# Slack for fp32 rounding in w / scale and (q - z) * scale (a few ulps of the element).
FP_SLACK = 1e-5

SETTINGS = settings(max_examples=40, deadline=None)
# The `path` fixture only pins PATHS for the whole test, so not resetting it per example is fine.
LINEAR_SETTINGS = settings(max_examples=25, deadline=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.tuples(st.integers(1, 40), st.integers(1, 32).map(lambda k: 8 * k))
log_scales = st.integers(-8, 8)
seeds = st.integers(0, 2**31 - 1)


def weight(N: int, K: int, seed: int, log_scale: int, kind: str = "randn") -> torch.Tensor:
    """Random [N, K] weight at magnitude 2**log_scale; some rows zero, some with an outlier."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 2.0**log_scale
    if kind == "positive":
        w = w.abs()  # a group range that does not straddle 0
    elif kind == "mixed":
        w[::3] = 0.0  # zero rows
        w[1::4, 0] *= 50.0  # outliers stretch one channel's / group's scale
        if N > 2:
            w[2] = 2.0**log_scale  # a constant row (constant groups)
    return w


kinds = st.sampled_from(["randn", "positive", "mixed"])


# ---- int8 -------------------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes, seed=seeds, log_scale=log_scales, kind=kinds)
def test_int8_round_trip_within_half_step(shape, seed, log_scale, kind):
    N, K = shape
    w = weight(N, K, seed, log_scale, kind)
    q, scale = Q.quantize_int8_channel(w)
    assert q.dtype == torch.int8 and q.shape == (N, K)
    assert scale.dtype == torch.float32 and scale.shape == (N,)
    assert int(q.min()) >= -127  # symmetric: -128 unused
    deq = Q.dequantize_int8_channel(q, scale)
    bound = scale[:, None] / 2 * (1 + FP_SLACK) + FP_SLACK * w.abs()
    assert ((w - deq).abs() <= bound).all()


def test_int8_zero_row_and_amax_exact():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.54, 0.5, 0.0]])
    q, scale = Q.quantize_int8_channel(w)
    assert scale[0] == 1.0 and (q[0] == 0).all()
    assert scale[1] == pytest.approx(2.54 / 127)
    assert int(q[1, 1]) == -127  # amax maps to the end of the range
    assert Q.dequantize_int8_channel(q, scale, torch.bfloat16).dtype == torch.bfloat16


def test_int8_matches_gemm_b_format():
    # kernels/triton/gemm.py "int8_channel": W = w.float() * w_scale[:, None].
    w = weight(7, 24, 0, 0)
    q, scale = Q.quantize_int8_channel(w)
    assert torch.equal(Q.dequantize_int8_channel(q, scale), q.float() * scale[:, None])


# ---- int4 packing and layout ------------------------------------------------------------------


def test_pack_unpack_identity_all_nibble_pairs():
    vals = torch.arange(16, dtype=torch.uint8)
    lo, hi = torch.meshgrid(vals, vals, indexing="ij")
    q = torch.stack((lo.flatten(), hi.flatten()), dim=-1).reshape(1, -1)  # all 256 pairs
    packed = Q.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 256)
    assert torch.equal(Q.unpack_int4(packed), q)
    assert sorted(packed.flatten().tolist()) == list(range(256))  # a bijection on bytes


def test_nibble_order_low_is_even_column():
    q = torch.tensor([[1, 2, 15, 0, 0, 9]], dtype=torch.uint8)
    assert Q.pack_int4(q).tolist() == [[0x21, 0x0F, 0x90]]
    assert Q.unpack_int4(torch.tensor([[0xA3]], dtype=torch.uint8)).tolist() == [[3, 10]]


def test_pack_rejects_odd_k():
    with pytest.raises(ValueError, match="even"):
        Q.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def test_int4_layout_dequantizes_by_group():
    # One row, K=16, G=8: check the stored tensors directly against the documented formula.
    w = torch.cat((torch.linspace(-1.0, 2.0, 8), torch.linspace(0.0, 3.0, 8))).reshape(1, 16)
    packed, scales, zeros = Q.quantize_int4_group(w, 8)
    assert packed.shape == (1, 8) and scales.shape == (1, 2) and zeros.shape == (1, 2)
    assert zeros.dtype == torch.uint8 and scales.dtype == torch.float32
    q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(1, 16).float()
    manual = (q - zeros.float().repeat_interleave(8, 1)) * scales.repeat_interleave(8, 1)
    assert torch.equal(Q.dequantize_int4_group(packed, scales, zeros, 8), manual)
    assert scales[0].tolist() == pytest.approx([3.0 / 15, 3.0 / 15])
    assert zeros[0].tolist() == [5, 0]  # -min / scale; the second group's min is 0


# ---- int4 round trip --------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes, seed=seeds, log_scale=log_scales, kind=kinds,
       requested=st.sampled_from([8, 16, 32, 64, 128]))
def test_int4_round_trip_within_half_step(shape, seed, log_scale, kind, requested):
    N, K = shape
    G = Q.resolve_group_size(K, requested)
    w = weight(N, K, seed, log_scale, kind)
    packed, scales, zeros = Q.quantize_int4_group(w, G)
    assert packed.shape == (N, K // 2) and packed.dtype == torch.uint8
    assert scales.shape == zeros.shape == (N, K // G)
    assert int(zeros.max()) <= 15
    deq = Q.dequantize_int4_group(packed, scales, zeros, G)
    s = scales.repeat_interleave(G, dim=1)
    bound = s / 2 * (1 + FP_SLACK) + FP_SLACK * w.abs()
    assert ((w - deq).abs() <= bound).all()
    # 0 is always representable exactly (the range is widened to include it).
    assert (deq[w == 0] == 0).all()


def test_int4_zero_and_constant_groups_exact():
    w = torch.zeros(3, 16)
    w[1, :8] = 0.75  # constant positive group
    w[2, 8:] = -3.0  # constant negative group
    packed, scales, zeros = Q.quantize_int4_group(w, 8)
    assert scales[0].tolist() == [1.0, 1.0] and zeros[0].tolist() == [0, 0]
    assert torch.equal(Q.dequantize_int4_group(packed, scales, zeros, 8), w)


def test_int4_rejects_bad_group():
    with pytest.raises(ValueError, match="resolve_group_size"):
        Q.quantize_int4_group(torch.zeros(2, 24), 16)


# ---- resolve_group_size -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("K", "requested", "expected"),
    [
        (256, 128, 128),  # divides
        (64, 128, 64),  # larger than K: K itself
        (192, 128, 96),  # largest multiple-of-8 divisor <= 128
        (40, 32, 8),  # 20 divides but is not a multiple of 8
        (36, 32, 18),  # no multiple of 8 divides: any divisor >= 8
        (12, 32, 12),
        (7, 7, 7),  # an exact divisor is kept even when odd and < 8
    ],
)
def test_resolve_group_size_cases(K, requested, expected):
    assert Q.resolve_group_size(K, requested) == expected


@pytest.mark.parametrize(("K", "requested"), [(14, 4), (7, 32), (24, 5), (16, 0)])
def test_resolve_group_size_error_names_k_and_request(K, requested):
    with pytest.raises(ValueError, match=rf"K={K}\b.*\b{requested}\b") as err:
        Q.resolve_group_size(K, requested)
    assert "\n" not in str(err.value)


@SETTINGS
@given(K=st.integers(1, 64).map(lambda k: 8 * k), requested=st.integers(8, 300))
def test_resolve_group_size_properties(K, requested):
    G = Q.resolve_group_size(K, requested)
    assert K % G == 0 and 8 <= G <= requested
    if K % requested == 0:
        assert requested == G


# ---- fp8 --------------------------------------------------------------------------------------

needs_fp8 = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8_e4m3fn")


@needs_fp8
@SETTINGS
@given(shape=shapes, seed=seeds, log_scale=log_scales, kind=kinds)
def test_fp8_round_trip_relative_error(shape, seed, log_scale, kind):
    N, K = shape
    w = weight(N, K, seed, log_scale, kind)
    q, scale = Q.quantize_fp8_channel(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (N,)
    assert torch.isfinite(q.float()).all()
    deq = Q.dequantize_fp8_channel(q, scale)
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 in the normal range (|w / scale| >= 2^-6);
    # below it the step is the subnormal one, 2^-9, so the error is <= 2^-10 * scale.
    bound = torch.maximum(w.abs() * 2.0**-4, scale[:, None] * 2.0**-10) * (1 + FP_SLACK)
    assert ((w - deq).abs() <= bound).all()


@needs_fp8
def test_fp8_zero_row():
    q, scale = Q.quantize_fp8_channel(torch.zeros(2, 8))
    assert scale.tolist() == [1.0, 1.0] and (q.float() == 0).all()


def test_fp8_missing_dtype_raises(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn", raising=False)
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        Q.quantize_fp8_channel(torch.ones(2, 8))


# ---- CPU linear paths -------------------------------------------------------------------------


def linear_tolerance(x: torch.Tensor, w: torch.Tensor, rel: float) -> torch.Tensor:
    # Summation-order error scales with sum_k |x_k w_k|, not with the (possibly cancelling) result.
    return rel * (x.float().abs() @ w.float().abs().t()) + 1e-6


def test_cpu_paths_reported():
    paths = Q.cpu_paths()
    assert set(paths) == {"int8_linear", "int4_linear", "int8_a8_linear"}
    assert paths["int8_a8_linear"] in {"torch._int_mm", "float64 reference"}
    assert paths["int8_linear"] in {"torch._weight_int8pack_mm", "dequantize+linear"}
    assert paths["int4_linear"] in {"torch._weight_int4pack_mm_for_cpu", "dequantize+linear"}


@pytest.fixture(params=["kernel", "dequantize"])
def path(request, monkeypatch):
    """Runs a test on torch's kernel path (as probed) and on the forced fallback."""
    if request.param == "dequantize":
        monkeypatch.setitem(Q.PATHS, "int8_linear", "dequantize+linear")
        monkeypatch.setitem(Q.PATHS, "int4_linear", "dequantize+linear")
    else:
        Q.cpu_paths()
    return request.param


@LINEAR_SETTINGS
@given(shape=shapes, M=st.integers(1, 5), seed=seeds, bias=st.booleans())
def test_int8_linear_matches_reference(path, shape, M, seed, bias):
    N, K = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, M, K, generator=gen)
    q, scale = Q.quantize_int8_channel(weight(N, K, seed, 0, "mixed"))
    b = torch.randn(N, generator=gen) if bias else None
    w = Q.dequantize_int8_channel(q, scale)
    y = Q.int8_linear(x, q, scale, b)
    assert y.shape == (2, M, N) and y.dtype == x.dtype
    assert ((y - F.linear(x, w, b)).abs() <= linear_tolerance(x, w, 1e-5)).all()


@LINEAR_SETTINGS
@given(N=st.sampled_from([1, 7, 16, 32, 48]), K=st.sampled_from([32, 64, 128, 256]),
       requested=st.sampled_from([8, 32, 64, 128, 256]), M=st.integers(1, 5), seed=seeds,
       bias=st.booleans())
def test_int4_linear_matches_reference(path, N, K, requested, M, seed, bias):
    # N a multiple of 16 and G in 32..256 take torch's kernel; the rest the fallback.
    G = Q.resolve_group_size(K, requested)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, 2, K, generator=gen)
    packed, scales, zeros = Q.quantize_int4_group(weight(N, K, seed, 0, "mixed"), G)
    b = torch.randn(N, generator=gen) if bias else None
    w = Q.dequantize_int4_group(packed, scales, zeros, G)
    y = Q.int4_linear(x, packed, scales, zeros, G, b)
    assert y.shape == (M, 2, N) and y.dtype == x.dtype
    assert ((y - F.linear(x, w, b)).abs() <= linear_tolerance(x, w, 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_half_precision(path, dtype):
    # Low-precision activations: the result is within a few roundings of the fp32 reference.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 128, generator=gen).to(dtype)
    w = torch.randn(32, 128, generator=gen)
    q, s = Q.quantize_int8_channel(w)
    w8 = Q.dequantize_int8_channel(q, s)
    y8 = Q.int8_linear(x, q, s)
    assert y8.dtype == dtype
    assert ((y8.float() - x.float() @ w8.t()).abs() <= linear_tolerance(x, w8, 2.0**-6)).all()
    p, sc, z = Q.quantize_int4_group(w, 64)
    w4 = Q.dequantize_int4_group(p, sc, z, 64)
    y4 = Q.int4_linear(x, p, sc, z, 64)
    assert y4.dtype == dtype
    assert ((y4.float() - x.float() @ w4.t()).abs() <= linear_tolerance(x, w4, 2.0**-6)).all()


def test_linear_empty_batch():
    q, s = Q.quantize_int8_channel(torch.randn(16, 64))
    assert Q.int8_linear(torch.randn(0, 64), q, s).shape == (0, 16)
    p, sc, z = Q.quantize_int4_group(torch.randn(16, 64), 32)
    assert Q.int4_linear(torch.randn(0, 64), p, sc, z, 32).shape == (0, 16)


@pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"), reason="no int8 CPU kernel")
def test_int8_kernel_direct():
    # Checks the kernel call itself, so a convention mismatch fails here rather than only
    # silently demoting PATHS to the fallback.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 96, generator=gen)
    q, s = Q.quantize_int8_channel(torch.randn(24, 96, generator=gen))
    w = Q.dequantize_int8_channel(q, s)
    y = Q._int8_kernel(x, q, s)
    assert ((y - x @ w.t()).abs() <= linear_tolerance(x, w, 1e-5)).all()


@pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="no int4 CPU kernel")
@pytest.mark.parametrize(("N", "K", "G"), [(16, 32, 32), (32, 256, 64), (48, 256, 128), (16, 512, 256)])
def test_int4_kernel_direct(N, K, G):
    # Our (q - z) * s with integer z vs torch's (q - 8) * s + zf convention.
    gen = torch.Generator().manual_seed(N + K + G)
    x = torch.randn(3, K, generator=gen)
    p, sc, z = Q.quantize_int4_group(weight(N, K, 3, 0, "mixed"), G)
    w = Q.dequantize_int4_group(p, sc, z, G)
    y = Q._int4_kernel(x, p, sc, z, G)
    assert ((y - x @ w.t()).abs() <= linear_tolerance(x, w, 1e-5)).all()
