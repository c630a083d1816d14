"""kernels/quant.py: round-trip error bounds, int4 packing layout, group-size resolution;
kernels/quant_linear.py and kernels/cpu_kernels.py: the CPU linear paths against dequantize +
F.linear, and the checks and state (`CpuKernels`) that choose them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llm_engine.kernels import cpu_kernels as CK
from llm_engine.kernels import quant as Q
from llm_engine.kernels import quant_linear as QL

torch.set_num_threads(1)

# Slack for fp32 rounding in w / scale and (q - z) * scale (a few ulps of the element).
FP_SLACK = 1e-5

SETTINGS = settings(max_examples=40, deadline=None)
# The `path` fixture only pins the CPU paths (`CK.KERNELS`) for the whole test, so not resetting
# it per example is fine.
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
    assert zeros.dtype == torch.float32 and scales.dtype == torch.float32
    q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(1, 16).float()
    manual = (q - zeros.float().repeat_interleave(8, 1)) * scales.repeat_interleave(8, 1)
    assert torch.equal(Q.dequantize_int4_group(packed, scales, zeros, 8), manual)
    assert scales[0].tolist() == pytest.approx([3.0 / 15, 3.0 / 15])
    assert zeros[0].tolist() == [5, 0]  # -min / scale; the second group's min is 0


# ---- int4 round trip --------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes, seed=seeds, log_scale=log_scales, kind=kinds,
       requested=st.sampled_from([8, 16, 32, 64, 128]), integer=st.booleans())
def test_int4_round_trip_within_half_step(shape, seed, log_scale, kind, requested, integer):
    N, K = shape
    G = Q.resolve_group_size(K, requested)
    w = weight(N, K, seed, log_scale, kind)
    packed, scales, zeros = Q.quantize_int4_group(w, G, integer_zeros=integer)
    assert packed.shape == (N, K // 2) and packed.dtype == torch.uint8
    assert zeros.dtype == (torch.uint8 if integer else torch.float32)
    assert scales.shape == zeros.shape == (N, K // G)
    assert int(zeros.max()) <= 15
    deq = Q.dequantize_int4_group(packed, scales, zeros, G)
    s = scales.repeat_interleave(G, dim=1)
    bound = s / 2 * (1 + FP_SLACK) + FP_SLACK * w.abs()
    assert ((w - deq).abs() <= bound).all()
    if integer:  # the older format: the grid is shifted by up to half a step
        assert (deq[w == 0] == 0).all()  # so 0 is a grid point
        return
    # The zero point is real, so the grid spans each group's range exactly: a group's min
    # and max (the range widened to include 0) come back to float rounding. (An all-zero
    # group has scale 1, zero 0.)
    g = w.reshape(N, K // G, G)
    lo, hi = g.amin(2).clamp(max=0), g.amax(2).clamp(min=0)
    grid = torch.stack((-zeros * scales, (Q.INT4_MAX - zeros) * scales), dim=-1)
    live = hi > lo
    gap = (grid - torch.stack((lo, hi), dim=-1)).abs()[live]
    assert (gap <= 1e-5 * (hi - lo)[live][:, None]).all()
    assert (zeros[~live] == 0).all() and (scales[~live] == 1).all()
    assert ((zeros >= 0) & (zeros <= Q.INT4_MAX)).all()


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


# ---- int4 packing and group sizes: random shapes -----------------------------------------------


@st.composite
def int4_shapes(draw):
    """(N, K, G): K even, G any divisor of K (including odd ones and G = K)."""
    N = draw(st.integers(1, 24))
    K = 2 * draw(st.integers(1, 96))
    G = draw(st.sampled_from([d for d in range(1, K + 1) if K % d == 0]))
    return N, K, G


@SETTINGS
@given(shape=int4_shapes(), seed=seeds, log_scale=log_scales, kind=kinds)
def test_int4_layout_and_round_trip_any_divisor(shape, seed, log_scale, kind):
    N, K, G = shape
    w = weight(N, K, seed, log_scale, kind)
    packed, scales, zeros = Q.quantize_int4_group(w, G)
    assert packed.shape == (N, K // 2) and scales.shape == zeros.shape == (N, K // G)
    # layout: byte j = column 2j (low nibble) | column 2j + 1 (high nibble)
    q = Q.unpack_int4(packed)
    assert torch.equal(packed, q[:, 0::2] | (q[:, 1::2] << 4))
    assert torch.equal(Q.pack_int4(q), packed) and int(q.max()) <= 15
    # the documented formula, group by group
    g = torch.arange(K) // G
    manual = (q.float() - zeros.float()[:, g]) * scales[:, g]
    deq = Q.dequantize_int4_group(packed, scales, zeros, G)
    assert torch.equal(deq, manual)
    bound = scales[:, g] / 2 * (1 + FP_SLACK) + FP_SLACK * w.abs()
    assert ((w - deq).abs() <= bound).all()


@SETTINGS
@given(q=st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0),
       rows=st.integers(1, 3))
def test_pack_int4_layout_random(q, rows):
    t = torch.tensor([q] * rows, dtype=torch.uint8)
    packed = Q.pack_int4(t)
    assert packed.tolist() == [[q[2 * j] | (q[2 * j + 1] << 4) for j in range(len(q) // 2)]] * rows
    assert torch.equal(Q.unpack_int4(packed), t)


def _resolve_spec(K: int, requested: int) -> int | None:
    """resolve_group_size's documented rule, by brute force (None: it must raise)."""
    if K % requested == 0:
        return requested
    divisors = [d for d in range(1, min(K, requested) + 1) if K % d == 0]
    for ok in (lambda d: d % 8 == 0, lambda d: d >= 8):
        good = [d for d in divisors if ok(d)]
        if good:
            return max(good)
    return None


@SETTINGS
@given(K=st.integers(1, 600), requested=st.integers(1, 300))
def test_resolve_group_size_fallback_rule(K, requested):
    want = _resolve_spec(K, requested)
    if want is None:
        with pytest.raises(ValueError, match=rf"K={K}\b"):
            Q.resolve_group_size(K, requested)
        return
    G = Q.resolve_group_size(K, requested)
    assert want == G and K % G == 0 and max(requested, 1) >= G
    if K % 2 == 0:  # and then the weight quantizes with it
        _, scales, _ = Q.quantize_int4_group(torch.randn(2, K), G)
        assert scales.shape == (2, K // G)


# ---- fp8 and int8 activations -----------------------------------------------------------------


@needs_fp8
@SETTINGS
@given(shape=shapes, seed=seeds, log_scale=log_scales, kind=kinds)
def test_fp8_channel_layout(shape, seed, log_scale, kind):
    N, K = shape
    w = weight(N, K, seed, log_scale, kind)
    q, scale = Q.quantize_fp8_channel(w)
    qf = q.float()
    assert (scale > 0).all() and (qf.abs() <= Q.FP8_E4M3_MAX).all()
    nonzero = w.abs().amax(dim=1) > 0
    # each non-zero row uses the full range: its amax lands on 448 exactly
    assert (qf.abs().amax(dim=1)[nonzero] == Q.FP8_E4M3_MAX).all()
    assert torch.equal(Q.dequantize_fp8_channel(q, scale), qf * scale[:, None])
    assert torch.equal(qf.to(torch.float8_e4m3fn).float(), qf)  # values on the e4m3 grid


@SETTINGS
@given(M=st.integers(1, 12), K=st.integers(1, 200), seed=seeds, log_scale=log_scales,
       zero_row=st.booleans())
def test_int8_token_quantization_within_half_step(M, K, seed, log_scale, zero_row):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * 2.0**log_scale * torch.logspace(-3, 3, M)[:, None]
    if zero_row:
        x[0] = 0.0
    xq, a = Q.quantize_int8_token(x)
    assert xq.dtype == torch.int8 and xq.shape == (M, K) and a.shape == (M,)
    assert int(xq.min()) >= -127  # symmetric
    amax = x.abs().amax(dim=1)
    assert torch.equal(a, torch.where(amax > 0, amax / 127, torch.ones_like(amax)))
    # each element within half a step (a / 2) of its dequantized value
    bound = a[:, None] / 2 * (1 + FP_SLACK) + FP_SLACK * x.abs()
    assert ((x - xq.float() * a[:, None]).abs() <= bound).all()
    # the row's amax maps to +-127; a zero row to a = 1, xq = 0
    rows = amax > 0
    assert (xq.abs().amax(dim=1)[rows] == 127).all()
    assert (a[~rows] == 1).all() and (xq[~rows] == 0).all()


def test_int8_token_rounds_half_to_even():
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, 0.5, -126.5]])  # amax 127: a = 1, exact ties
    xq, a = Q.quantize_int8_token(x)
    assert a.item() == 1.0 and xq.tolist() == [[127, 2, 4, -2, 0, -126]]


# ---- CPU linear paths -------------------------------------------------------------------------


def linear_tolerance(x: torch.Tensor, w: torch.Tensor, rel: float) -> torch.Tensor:
    # Summation-order error scales with sum_k |x_k w_k|, not with the (possibly cancelling) result.
    return rel * (x.float().abs() @ w.float().abs().t()) + 1e-6


def test_cpu_paths_reported():
    paths = CK.cpu_paths()
    assert set(paths) == {"int8_linear", "int4_linear", "int8_a8_linear", "fp8_a8_linear",
                          "fp8_a8_token_linear", "fp8_a8_group_linear"}
    kernels = {"int8_linear": "torch._weight_int8pack_mm",
               "int4_linear": "torch._weight_int4pack_mm_for_cpu",
               "int8_a8_linear": "torch._int_mm"}
    fallbacks = {"int8_linear": {"dequantize+linear"}, "int4_linear": {"dequantize+linear"},
                 "int8_a8_linear": {"exact float32 linear", "float64 reference"}}
    for op, kernel in kernels.items():
        limit = CK.KERNELS.max_rows[op]
        assert paths[op] in fallbacks[op] or \
            (limit > 0 and paths[op].startswith(
                f"{kernel} (<= {limit} rows, on weight shapes it verifies on), else "))
    assert paths["fp8_a8_linear"] in {"dequantize+linear (float16 bit cast)", "dequantize+linear"}
    # on this torch the exact float32 path and the fp8 bit cast verify
    assert paths["int8_a8_linear"] != "float64 reference"
    if hasattr(torch, "float8_e4m3fn"):
        assert paths["fp8_a8_linear"] == "dequantize+linear (float16 bit cast)"
        assert paths["fp8_a8_token_linear"] == "dequantize+linear (float16 bit cast)"
        assert paths["fp8_a8_group_linear"] == "dequantize+linear (float16 bit cast)"


def test_cpu_paths_name_the_kernels_when_enabled(monkeypatch):
    monkeypatch.setattr(CK, "KERNELS", CK.CpuKernels())
    monkeypatch.setitem(CK.KERNELS.max_rows, "int8_linear", 4)
    paths = CK.cpu_paths()
    if CK.KERNELS.check("int8_linear"):
        assert paths["int8_linear"] == ("torch._weight_int8pack_mm (<= 4 rows, on weight shapes "
                                        "it verifies on), else dequantize+linear")


def test_reset_forgets_checks_and_paths_but_keeps_limits(monkeypatch):
    state = CK.CpuKernels(max_rows={**CK.KERNEL_MAX_ROWS, "int8_a8_linear": 8})
    monkeypatch.setattr(CK, "KERNELS", state)
    gen = torch.Generator().manual_seed(1)
    q, scale = Q.quantize_int8_channel(torch.randn(16, 32, generator=gen))
    QL.int8_a8_linear(torch.randn(3, 32, generator=gen), q, scale)
    paths = dict(state.paths)
    assert set(paths) == {"int8_a8_linear"} and state.verified
    if state.check("int8_a8_linear"):
        assert state.shape_verified
    state.reset()
    assert not (state.paths or state.verified or state.shape_verified)
    assert state.max_rows["int8_a8_linear"] == 8
    assert CK.cpu_paths()["int8_a8_linear"] == paths["int8_a8_linear"]  # the checks run again


def test_a_kernel_runs_only_the_weight_shapes_it_verified_on(monkeypatch):
    """torch's int8 kernel returned garbage on an AVX-512/VNNI CPU for a shape the one-shape
    probe never tried. Here a kernel that is right on the probe's shape and wrong at K = 64
    must not be used at K = 64, while K = 48 (where it is right) still takes it; shapes whose K
    is not a multiple of 16 never take it."""
    real, calls = torch._int_mm, []

    def flaky(a, b):
        calls.append(a.shape[1])
        out = real(a, b)
        return out + 12345 if a.shape[1] == 64 else out

    monkeypatch.setattr(torch, "_int_mm", flaky)
    monkeypatch.setattr(CK, "KERNELS", CK.CpuKernels())
    monkeypatch.setitem(CK.KERNELS.max_rows, "int8_a8_linear", 8)
    gen = torch.Generator().manual_seed(0)
    for K, kernel in ((64, False), (48, True), (40, False)):
        x = torch.randn(3, K, generator=gen)
        q, scale = Q.quantize_int8_channel(torch.randn(5, K, generator=gen))
        calls.clear()
        y = QL.int8_a8_linear(x, q, scale)
        assert ((y - Q.int8_a8_linear_reference(x, q, scale)).abs() < 1e-4).all(), K
        assert CK.KERNELS.shape_verified.get(("int8_a8_linear", 5, K, torch.float32, 2)) is \
            (True if kernel else False if K % 16 == 0 else None), K
        calls.clear()  # the shape is checked now: the next call runs the kernel or not
        assert torch.equal(QL.int8_a8_linear(x, q, scale), y)
        assert calls == ([K] if kernel else []), K


@pytest.fixture(params=["kernel", "dequantize", "chunked"])
def path(request, monkeypatch):
    """Runs a test on torch's kernels (at every row count, where they verify), on the
    dequantizing paths as chosen, and on those with tiny row blocks (many blocks per weight)."""
    rows = 1 << 30 if request.param == "kernel" else 0
    # a fresh state: no test sees another's checks, and the process's comes back afterwards
    state = CK.CpuKernels(max_rows=dict.fromkeys(CK.KERNEL_MAX_ROWS, rows))
    monkeypatch.setattr(CK, "KERNELS", state)
    if request.param == "chunked":
        monkeypatch.setattr(CK, "_CHUNK_ELEMENTS", 64)
        monkeypatch.setattr(CK, "_EXACT_K", 16)  # the int8 dot in several K slices too
    CK.cpu_paths()
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
    y = QL.int8_linear(x, q, scale, b)
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
    y = QL.int4_linear(x, packed, scales, zeros, G, b)
    assert y.shape == (M, 2, N) and y.dtype == x.dtype
    # torch's kernel builds W as (q - 8) * s + (8 - z) * s: its rounding is relative to those
    # terms (up to 16 s), not to W, which is ~0 where q is near z.
    w_terms = w.abs() + 16 * scales.repeat_interleave(G, dim=1)
    assert ((y - F.linear(x, w, b)).abs() <= linear_tolerance(x, w_terms, 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_half_precision(path, dtype):
    # Low-precision activations: the result is within a few roundings of the fp32 reference.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 128, generator=gen).to(dtype)
    w = torch.randn(32, 128, generator=gen)
    q, s = Q.quantize_int8_channel(w)
    w8 = Q.dequantize_int8_channel(q, s)
    y8 = QL.int8_linear(x, q, s)
    assert y8.dtype == dtype
    assert ((y8.float() - x.float() @ w8.t()).abs() <= linear_tolerance(x, w8, 2.0**-6)).all()
    p, sc, z = Q.quantize_int4_group(w, 64)
    w4 = Q.dequantize_int4_group(p, sc, z, 64)
    y4 = QL.int4_linear(x, p, sc, z, 64)
    assert y4.dtype == dtype
    assert ((y4.float() - x.float() @ w4.t()).abs() <= linear_tolerance(x, w4, 2.0**-6)).all()


def test_linear_empty_batch(path):
    q, s = Q.quantize_int8_channel(torch.randn(16, 64))
    assert QL.int8_linear(torch.randn(0, 64), q, s).shape == (0, 16)
    assert QL.int8_a8_linear(torch.randn(0, 64), q, s).shape == (0, 16)
    p, sc, z = Q.quantize_int4_group(torch.randn(16, 64), 32)
    assert QL.int4_linear(torch.randn(0, 64), p, sc, z, 32).shape == (0, 16)


# ---- W8A8 linears against float64 -------------------------------------------------------------

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def fits(y64: torch.Tensor, bias, dtype) -> bool:
    """The result and its bias sum are finite in `dtype` (float16 overflows at 65504)."""
    y_b = y64.abs() + (0 if bias is None else bias.double().abs())
    return bool((y_b < torch.finfo(dtype).max / 2).all())


def a8_tolerance(y64: torch.Tensor, sum_abs: torch.Tensor, K: int, bias, dtype) -> torch.Tensor:
    """|got - y64| bound for a W8A8 linear whose exact result is y64 (float64, before the bias):
    float32 accumulation of K products, at most K * u32 * sum_k |products| (zero where the
    accumulation is exact); a few float32 roundings of the scaling, 4 * u32 * |y|; the rounding
    to the output dtype, u * |y|; adding the bias in that dtype, u * |y + b|; and where those
    results are subnormal, half a subnormal step each (2 * u * smallest normal)."""
    u32, u = 2.0**-24, UNIT_ROUNDOFF[dtype]
    y_b = y64 if bias is None else y64 + bias.double()
    subnormal_step = 2 * u * torch.finfo(dtype).tiny
    return K * u32 * sum_abs + (4 * u32 + u) * y64.abs() + u * y_b.abs() + subnormal_step


@LINEAR_SETTINGS
@given(M=st.integers(1, 6), N=st.integers(1, 40), K=st.integers(1, 80), seed=seeds,
       log_scale=log_scales, bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_int8_a8_linear_vs_float64(path, M, N, K, seed, log_scale, bias, dtype):
    """int8 x int8 products are integers, accumulated exactly on every path (int32 or exact
    float32 dots), so only the scaling and the output rounding differ from float64."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=gen) * torch.logspace(-2, 2, M)[:, None]).to(dtype)
    q, scale = Q.quantize_int8_channel(weight(N, K, seed, log_scale, "mixed"))
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    xq, a = Q.quantize_int8_token(x)
    exact = xq.double() @ q.double().t()
    assert torch.equal(exact, (xq.long() @ q.long().t()).double())  # float64 is exact here
    y64 = exact * a.double()[:, None] * scale.double()[None, :]
    assume(fits(y64, b, dtype))
    y = QL.int8_a8_linear(x, q, scale, b)
    assert y.dtype == dtype and y.shape == (M, N)
    tol = a8_tolerance(y64, torch.zeros_like(y64), K, b, dtype)
    assert ((y.double() - (y64 if b is None else y64 + b.double())).abs() <= tol).all()
    if CK.KERNELS.paths["int8_a8_linear"] in ("exact float32 linear", "float64 reference"):
        assert torch.equal(y, Q.int8_a8_linear_reference(x, q, scale, b))  # bit for bit


@needs_fp8
@LINEAR_SETTINGS
@given(M=st.integers(1, 6), N=st.integers(1, 40), K=st.integers(1, 80), seed=seeds,
       log_scale=log_scales, saturate=st.sampled_from([0.5, 1.0, 2.0]), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_fp8_a8_linear_vs_float64(path, M, N, K, seed, log_scale, saturate, bias, dtype):
    """e4m3 x e4m3 products are exact in float32; their float32 sum is not, so the bound has
    the summation term K * u32 * sum |xq w| * x_scale * scale. x_scale = amax / 448 / saturate:
    saturate 2 clamps the largest activations (the definition's clamp, in both)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=gen) * 2.0**log_scale).to(dtype)
    x_scale = (x.float().abs().amax().clamp_min(1e-30) / Q.FP8_E4M3_MAX / saturate).reshape(1)
    q, scale = Q.quantize_fp8_channel(weight(N, K, seed + 1, 0, "mixed"))
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    xq = Q.quantize_fp8_tensor(x, x_scale).double()
    c = (x_scale.float() * scale.float()).double()  # the definition's fp32 product
    y64 = (xq @ q.double().t()) * c[None, :]
    sum_abs = (xq.abs() @ q.double().abs().t()) * c[None, :]
    assume(fits(y64, b, dtype))
    y = QL.fp8_a8_linear(x, q, scale, x_scale, b)
    assert y.dtype == dtype and y.shape == (M, N)
    tol = a8_tolerance(y64, sum_abs, K, b, dtype)
    assert ((y.double() - (y64 if b is None else y64 + b.double())).abs() <= tol).all()


@needs_fp8
@LINEAR_SETTINGS
@given(M=st.integers(1, 6), N=st.integers(1, 40), K=st.integers(1, 80), seed=seeds,
       log_scale=log_scales, zero_row=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_fp8_a8_token_linear_vs_float64(path, M, N, K, seed, log_scale, zero_row, bias, dtype):
    """Per-token fp8: rows at magnitudes 2**-3 apart each get their own scale (so each row's
    largest value is exact); an all-zero row gives the bias. Bound as for the static scale."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2.0 ** (log_scale - 3 * torch.arange(M, dtype=torch.float32))
    x = (torch.randn(M, K, generator=gen) * rows[:, None]).to(dtype)
    if zero_row:
        x[0] = 0
    q, scale = Q.quantize_fp8_channel(weight(N, K, seed + 1, 0, "mixed"))
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    xq, a = Q.quantize_fp8_token(x)
    assert (xq.float().abs().amax(dim=1)[x.float().abs().amax(dim=1) > 0] == 448).all()
    c = a.double()[:, None] * scale.double()[None, :]
    y64 = (xq.double() @ q.double().t()) * c
    sum_abs = (xq.double().abs() @ q.double().abs().t()) * c
    assume(fits(y64, b, dtype))
    y = QL.fp8_a8_token_linear(x, q, scale, b)
    assert y.dtype == dtype and y.shape == (M, N)
    tol = a8_tolerance(y64, sum_abs, K, b, dtype)
    assert ((y.double() - (y64 if b is None else y64 + b.double())).abs() <= tol).all()


@needs_fp8
@LINEAR_SETTINGS
@given(M=st.integers(1, 6), N=st.integers(1, 40), groups=st.integers(1, 5),
       G=st.sampled_from([16, 32, 64]), seed=seeds, log_scale=log_scales,
       zero_group=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_fp8_a8_group_linear_vs_float64(path, M, N, groups, G, seed, log_scale, zero_group,
                                        bias, dtype):
    """Per-token-group fp8: rows 2**-3 and groups 2**-4 apart in magnitude, each (row, group)
    with its own scale, so each group's largest value is exact; an all-zero group adds
    nothing. y64 = sum_g a[m, g] * (xq_g . q_g) * scale; the bound as for per-token, where
    the path's one float32 rounding of xq * a per element is inside K * u32 * sum|...|."""
    K = groups * G
    gen = torch.Generator().manual_seed(seed)
    rows = 2.0 ** (log_scale - 3 * torch.arange(M, dtype=torch.float32))
    cols = (2.0 ** (-4 * torch.arange(groups, dtype=torch.float32))).repeat_interleave(G)
    x = (torch.randn(M, K, generator=gen) * rows[:, None] * cols[None, :]).to(dtype)
    if zero_group:
        x[0, :G] = 0
    q, scale = Q.quantize_fp8_channel(weight(N, K, seed + 1, 0, "mixed"))
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    xq, a = Q.quantize_fp8_token_group(x, G)
    assert a.shape == (M, groups)
    gmax = x.float().abs().reshape(M, groups, G).amax(-1)
    assert (xq.float().abs().reshape(M, groups, G).amax(-1)[gmax > 0] == 448).all()
    assert (a[gmax == 0] == 1).all()
    xd = (xq.double().reshape(M, groups, G) * a.double()[..., None]).reshape(M, K)
    y64 = (xd @ q.double().t()) * scale.double()[None, :]
    sum_abs = (xd.abs() @ q.double().abs().t()) * scale.double()[None, :]
    assume(fits(y64, b, dtype))
    y = QL.fp8_a8_group_linear(x, q, scale, G, b)
    assert y.dtype == dtype and y.shape == (M, N)
    tol = a8_tolerance(y64, sum_abs, K, b, dtype)
    assert ((y.double() - (y64 if b is None else y64 + b.double())).abs() <= tol).all()


@needs_fp8
def test_fp8_token_group_is_per_token_at_one_group():
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(3)) * 7
    xq, a = Q.quantize_fp8_token_group(x, 96)
    xq1, a1 = Q.quantize_fp8_token(x)
    assert torch.equal(xq.view(torch.uint8), xq1.view(torch.uint8)) and torch.equal(a[:, 0], a1)
    with pytest.raises(ValueError, match="does not divide K=96"):
        Q.quantize_fp8_token_group(x, 64)


@needs_fp8
def test_fp8_bit_cast_is_exact_for_every_value():
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    want = every.float()
    got = CK.fp8_div256(every) * 256
    finite = ~want.isnan()
    assert finite.sum() == 254  # e4m3fn: NaN is 0x7f / 0xff only; no inf
    assert torch.equal(got[finite], want[finite])
    assert torch.equal(got[finite].signbit(), want[finite].signbit())  # -0.0 included


def test_exact_int8_dot_at_its_worst_case():
    """K = 1100 needs two float32 slices; each slice's sums reach ~2**24 and stay exact."""
    a = torch.full((2, 1100), 127, dtype=torch.int8)
    b = torch.full((3, 1100), -127, dtype=torch.int8)
    got = CK.int8_dot_exact(a, b)
    assert torch.equal(got, torch.full((2, 3), -1100.0 * 127 * 127, dtype=torch.float64))


def test_row_blocks_match_one_block(monkeypatch):
    """The chunked dequantizing paths give what one whole-weight F.linear gives."""
    gen = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(3, 64, generator=gen), torch.randn(37, 64, generator=gen), \
        torch.randn(37, generator=gen)
    q, s = Q.quantize_int8_channel(w)
    whole = QL.int8_linear(x, q, s, b)
    monkeypatch.setattr(CK, "_CHUNK_ELEMENTS", 64 * 5)  # 5 rows a block: 8 blocks, the last short
    blocks = QL.int8_linear(x, q, s, b)
    assert torch.allclose(blocks, whole, rtol=1e-6, atol=1e-6)


# ---- kernels called directly ------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"), reason="no int8 CPU kernel")
def test_int8_kernel_direct():
    # Checks the kernel call itself, so a convention mismatch fails here rather than only
    # silently demoting KERNELS.paths to the fallback.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 96, generator=gen)
    q, s = Q.quantize_int8_channel(torch.randn(24, 96, generator=gen))
    w = Q.dequantize_int8_channel(q, s)
    y = CK.int8_kernel(x, q, s)
    assert ((y - x @ w.t()).abs() <= linear_tolerance(x, w, 1e-5)).all()


needs_int4_kernel = pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"),
                                       reason="no int4 CPU kernel")


@needs_int4_kernel
@pytest.mark.parametrize(("N", "K", "G"), [(16, 32, 32), (32, 256, 64), (48, 256, 128), (16, 512, 256)])
def test_int4_kernel_direct(N, K, G):
    # Our (q - z) * s with integer z vs torch's (q - 8) * s + zf convention.
    gen = torch.Generator().manual_seed(N + K + G)
    x = torch.randn(3, K, generator=gen)
    p, sc, z = Q.quantize_int4_group(weight(N, K, 3, 0, "mixed"), G)
    w = Q.dequantize_int4_group(p, sc, z, G)
    y = CK.int4_kernel(x, p, sc, z, G)
    w_terms = w.abs() + 16 * sc.repeat_interleave(G, dim=1)  # see test_int4_linear_...
    assert ((y - x @ w.t()).abs() <= linear_tolerance(x, w_terms, 1e-5)).all()


@needs_int4_kernel
def test_int4_pack_is_converted_once_per_weight(monkeypatch):
    calls = []
    convert = torch._convert_weight_to_int4pack_for_cpu

    def counting(*args):
        calls.append(1)
        return convert(*args)

    monkeypatch.setattr(torch, "_convert_weight_to_int4pack_for_cpu", counting)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 64, generator=gen)
    p, sc, z = Q.quantize_int4_group(torch.randn(32, 64, generator=gen), 32)
    y1 = CK.int4_kernel(x, p, sc, z, 32)
    y2 = CK.int4_kernel(x, p, sc, z, 32)
    CK.int4_kernel(x.bfloat16(), p, sc, z, 32)  # another activation dtype: same pack
    assert len(calls) == 1 and torch.equal(y1, y2)
    # a weight changed in place is converted again, and gives the new result
    p2, sc2, z2 = Q.quantize_int4_group(torch.randn(32, 64, generator=gen), 32)
    p.copy_(p2)
    sc.copy_(sc2)
    z.copy_(z2)
    y3 = CK.int4_kernel(x, p, sc, z, 32)
    assert len(calls) == 2
    w2 = Q.dequantize_int4_group(p2, sc2, z2, 32)
    w_terms = w2.abs() + 16 * sc2.repeat_interleave(32, dim=1)
    assert ((y3 - x @ w2.t()).abs() <= linear_tolerance(x, w_terms, 1e-5)).all()
    # the entry goes with the weight
    key = id(p)
    assert key in CK._INT4_PACKS
    del p
    assert key not in CK._INT4_PACKS
    # weights made in inference mode (no version counter) are cached too
    with torch.inference_mode():
        p3 = p2.clone()
        CK.int4_kernel(x, p3, sc2, z2, 32)
        CK.int4_kernel(x, p3, sc2, z2, 32)
    assert len(calls) == 3
