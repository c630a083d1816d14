"""builder/quant: GPTQ and AWQ produce the int4 group format of kernels.quant, and on inputs
with outlier channels and correlated features both beat round-to-nearest on held-out data."""

from __future__ import annotations

import math

import pytest
import torch

from llm_engine.builder.quant.awq import AwqResult, awq_search, awq_search_stats, fake_quant_int4
from llm_engine.builder.quant.gptq import gptq_quantize, hessian_error
from llm_engine.kernels import quant as Q

torch.set_num_threads(1)

N, K, G = 192, 384, 128
# Measured ratios of held-out output error to RTN's on `data()` below (torch 2.13, CPU):
# GPTQ 0.41 (act_order off) / 0.33 (on); AWQ 0.55 (scales + clip), 0.61 (scales only),
# 0.60 (clip only).
GPTQ_MAX_RATIO = 0.6
AWQ_MAX_RATIO = 0.85


def data(M: int, seed: int) -> torch.Tensor:
    """x [M, K]: low-rank correlated features plus noise, 8 input channels 20x larger. The
    mixing matrix is fixed, so every seed draws from the same distribution."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(K // 8, K, generator=torch.Generator().manual_seed(1234)) / (K // 8) ** 0.5
    x = torch.randn(M, K // 8, generator=gen) @ mix + 0.3 * torch.randn(M, K, generator=gen)
    x[:, 3::48] *= 20.0
    return x


@pytest.fixture(scope="module")
def problem():
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(7))
    x_cal, x_test = data(2048, 1), data(2048, 2)
    return w, x_cal, x_test


def rel_err(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    y = x @ w.t()
    return float((y - x @ w_hat.t()).norm() / y.norm())


def hessian(x: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    return xd.t() @ xd


def check_format(packed, scales, zeros, n: int, k: int, g: int) -> torch.Tensor:
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (n, k // 2)
    assert scales.dtype == torch.float32 and tuple(scales.shape) == (n, k // g)
    assert zeros.dtype in (torch.float32, torch.uint8) and tuple(zeros.shape) == (n, k // g)
    assert (scales > 0).all() and ((zeros >= 0) & (zeros <= Q.INT4_MAX)).all()
    assert torch.equal(Q.pack_int4(Q.unpack_int4(packed)), packed)
    w_hat = Q.dequantize_int4_group(packed, scales, zeros, g)
    assert w_hat.shape == (n, k) and torch.isfinite(w_hat).all()
    return w_hat


# ---------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_held_out(problem, act_order):
    w, x_cal, x_test = problem
    w_hat = check_format(*gptq_quantize(w, hessian(x_cal), G, act_order=act_order), N, K, G)
    rtn = rel_err(w, Q.dequantize_int4_group(*Q.quantize_int4_group(w, G), G), x_test)
    ratio = rel_err(w, w_hat, x_test) / rtn
    assert ratio < GPTQ_MAX_RATIO, f"GPTQ / RTN held-out error {ratio:.3f}"


def test_gptq_act_order_keeps_static_groups(problem):
    """With act_order the group parameters are those of RTN on the original weight."""
    w, x_cal, _ = problem
    _, scales, zeros = gptq_quantize(w, hessian(x_cal), G, act_order=True)
    _, s_rtn, z_rtn = Q.quantize_int4_group(w, G)
    assert torch.equal(scales, s_rtn) and torch.equal(zeros, z_rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_diagonal_hessian_is_rtn(act_order):
    """Uncorrelated inputs: no error feedback crosses columns, so GPTQ = RTN bit for bit."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 256, generator=gen)
    h = torch.diag(torch.rand(256, generator=gen, dtype=torch.float64) + 0.1)
    got = gptq_quantize(w, h, 64, act_order=act_order, block_size=32)
    want = Q.quantize_int4_group(w, 64)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("group", "block"), [(32, 128), (64, 48), (128, 64)])
def test_gptq_group_and_block_sizes(problem, group, block):
    w, x_cal, x_test = problem
    w_hat = check_format(*gptq_quantize(w, hessian(x_cal), group, block_size=block,
                                        act_order=False), N, K, group)
    rtn = Q.dequantize_int4_group(*Q.quantize_int4_group(w, group), group)
    assert rel_err(w, w_hat, x_test) < GPTQ_MAX_RATIO * rel_err(w, rtn, x_test)
    # The proxy loss on the calibration set agrees.
    h = hessian(x_cal)
    assert hessian_error(w, w_hat, h) < hessian_error(w, rtn, h)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_dead_columns(problem, act_order):
    w, x_cal, x_test = problem
    dead = torch.zeros(K, dtype=torch.bool)
    dead[[0, 5, 130, 131, 383]] = True
    x_cal, x_test = x_cal.clone(), x_test.clone()
    x_cal[:, dead] = 0.0
    x_test[:, dead] = 0.0
    packed, scales, zeros = gptq_quantize(w, hessian(x_cal), G, act_order=act_order)
    w_hat = check_format(packed, scales, zeros, N, K, G)
    # Dead weights take the code nearest 0 (exactly 0 only where the zero point is an integer).
    half_step = scales.repeat_interleave(G, dim=1)[:, dead] / 2
    assert (w_hat[:, dead].abs() <= half_step * (1 + 1e-5)).all()
    rtn = Q.dequantize_int4_group(*Q.quantize_int4_group(w, G), G)
    assert rel_err(w, w_hat, x_test) < GPTQ_MAX_RATIO * rel_err(w, rtn, x_test)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_integer_zero_points(problem, act_order):
    """integer_zeros: uint8 integer zero points (the older format), still better than RTN with
    them; worse than the real-valued ones on this layer."""
    w, x_cal, x_test = problem
    packed, scales, zeros = gptq_quantize(w, hessian(x_cal), G, act_order=act_order,
                                          integer_zeros=True)
    assert zeros.dtype == torch.uint8
    w_int = check_format(packed, scales, zeros, N, K, G)
    rtn = Q.dequantize_int4_group(*Q.quantize_int4_group(w, G, integer_zeros=True), G)
    assert rel_err(w, w_int, x_test) < GPTQ_MAX_RATIO * rel_err(w, rtn, x_test)
    w_real = Q.dequantize_int4_group(*gptq_quantize(w, hessian(x_cal), G, act_order=act_order), G)
    assert rel_err(w, w_real, x_test) < rel_err(w, w_int, x_test)
    _, s, z = Q.quantize_int4_group(w, G)
    with pytest.raises(ValueError, match="integer zeros"):
        gptq_quantize(w, hessian(x_cal), G, group_params=(s, z), integer_zeros=True)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_given_group_params(problem, act_order):
    """Ranges from AWQ's clip search, GPTQ rounding into them: the parameters come back as
    given, and the result beats both RTN into the same ranges and plain RTN."""
    w, x_cal, x_test = problem
    clipped = awq_search(w, x_cal, G, search_scales=False).weight
    _, scales, zeros = Q.quantize_int4_group(clipped, G)
    packed, s2, z2 = gptq_quantize(w, hessian(x_cal), G, act_order=act_order,
                                   group_params=(scales, zeros))
    assert torch.equal(s2, scales) and torch.equal(z2, zeros)
    w_hat = check_format(packed, s2, z2, N, K, G)
    clip_rtn = Q.dequantize_int4_group(*Q.quantize_int4_group(clipped, G), G)
    rtn = Q.dequantize_int4_group(*Q.quantize_int4_group(w, G), G)
    assert rel_err(w, w_hat, x_test) < rel_err(w, clip_rtn, x_test) < rel_err(w, rtn, x_test)
    with pytest.raises(ValueError, match="group_params"):
        gptq_quantize(w, hessian(x_cal), G, group_params=(scales[:, :1], zeros))


def test_gptq_all_dead_and_rank_deficient():
    w = torch.randn(16, 64)
    packed, scales, zeros = gptq_quantize(w, torch.zeros(64, 64, dtype=torch.float64), 32)
    assert (check_format(packed, scales, zeros, 16, 64, 32) == 0).all()
    # Fewer samples than features: H is singular, the dampening makes it invertible. With a
    # dampening this small GPTQ loses to RTN on a few problems in a hundred (seeded here: the
    # global RNG state depends on which tests ran before), so the claim is about the typical one.
    ratios = []
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        w, x = torch.randn(16, 64, generator=gen), torch.randn(8, 64, generator=gen)
        w_hat = check_format(*gptq_quantize(w, hessian(x), 32, damp=1e-6), 16, 64, 32)
        rtn = Q.dequantize_int4_group(*Q.quantize_int4_group(w, 32), 32)
        ratios.append(hessian_error(w, w_hat, hessian(x)) / hessian_error(w, rtn, hessian(x)))
    assert all(map(math.isfinite, ratios)) and sorted(ratios)[10] < 0.3, ratios


def test_gptq_errors():
    w = torch.randn(8, 96)
    h = torch.eye(96, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not divide K=96"):
        gptq_quantize(w, h, 64)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(w, torch.eye(64), 32)
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(w[0], h, 32)


# ---------------------------------------------------------------------------------------------
# AWQ
# ---------------------------------------------------------------------------------------------


def awq_weight(res: AwqResult, group: int = G) -> tuple[torch.Tensor, torch.Tensor]:
    """(the stored int4 weight dequantized, the effective weight Q(W * s) / s)."""
    stored = check_format(*Q.quantize_int4_group(res.weight, group), *res.weight.shape, group)
    return stored, stored / res.scales


@pytest.mark.parametrize("integer", [False, True])
def test_fake_quant_matches_format(integer):
    w = torch.randn(10, 256) * torch.rand(10, 1) * 3
    w[2] = 0.0
    w[3] = w[3].abs()
    assert torch.equal(fake_quant_int4(w, 64, integer), Q.dequantize_int4_group(
        *Q.quantize_int4_group(w, 64, integer), 64))


@pytest.mark.parametrize(("search_scales", "clip"), [(True, True), (True, False), (False, True)])
def test_awq_beats_rtn_held_out(problem, search_scales, clip):
    w, x_cal, x_test = problem
    res = awq_search(w, x_cal, G, search_scales=search_scales, clip=clip)
    assert res.scales.shape == (K,) and res.weight.shape == (N, K)
    assert res.weight.dtype == torch.float32 and res.scales.dtype == torch.float32
    _, w_eff = awq_weight(res)
    rtn = rel_err(w, Q.dequantize_int4_group(*Q.quantize_int4_group(w, G), G), x_test)
    ratio = rel_err(w, w_eff, x_test) / rtn
    assert ratio < AWQ_MAX_RATIO, f"AWQ / RTN held-out error {ratio:.3f}"
    assert res.loss < res.rtn_loss
    if search_scales:
        assert 0 < res.alpha < 1
        # The big channels get the big scales.
        assert res.scales[3::48].min() > res.scales.median()
    else:
        assert torch.equal(res.scales, torch.ones(K))
    # The reported loss is the sample's output MSE of the effective weight.
    mse = float(((x_cal @ w.t() - x_cal @ w_eff.t()) ** 2).mean())
    assert res.loss == pytest.approx(mse, rel=1e-3)


@pytest.mark.parametrize("kwargs", [{"grid": 1}, {"search_scales": False}])
def test_awq_off_is_rtn(problem, kwargs):
    """alpha = 0 only (grid 1) or no scale search, and no clipping: exactly RTN."""
    w, x_cal, _ = problem
    res = awq_search(w, x_cal, G, clip=False, **kwargs)
    assert res.alpha == 0.0 and torch.equal(res.scales, torch.ones(K))
    assert torch.equal(res.weight, w)
    for a, b in zip(Q.quantize_int4_group(res.weight, G), Q.quantize_int4_group(w, G)):
        assert torch.equal(a, b)
    assert res.loss == res.rtn_loss


def test_awq_clip_stays_in_range_and_chunks_agree(problem):
    w, x_cal, _ = problem
    a = awq_search(w, x_cal, G, search_scales=False, chunk=1024)
    b = awq_search(w, x_cal, G, search_scales=False, chunk=50)
    assert torch.equal(a.weight, b.weight)
    # Clipping only shrinks each group's range, never by more than max_shrink.
    wg, cg = w.reshape(N, -1, G), a.weight.reshape(N, -1, G)
    assert (cg.amax(2) <= wg.amax(2)).all() and (cg.amin(2) >= wg.amin(2)).all()
    assert (cg.amax(2) >= 0.5 * wg.amax(2) - 1e-6).all()
    assert not torch.equal(a.weight, w)


def test_awq_clip_each_end_beats_symmetric(problem):
    """After the symmetric shrink each end of a group's range is searched on its own: the
    output error is never above the symmetric search's, and skewed groups clip one side."""
    from llm_engine.builder.quant.awq import _best_ratio, _quant_range

    w, x_cal, _ = problem
    gram = (x_cal.double().t() @ x_cal.double())
    clipped = awq_search(w, x_cal, G, search_scales=False).weight
    wg = w.reshape(N, -1, G)
    lo, hi = wg.amin(2, keepdim=True).clamp(max=0), wg.amax(2, keepdim=True).clamp(min=0)
    blocks = torch.stack([gram[g * G:(g + 1) * G, g * G:(g + 1) * G] for g in range(K // G)])
    blocks = (blocks / blocks.diagonal(dim1=1, dim2=2).mean()).float()
    ratios = [1.0 - 0.5 * i / 19 for i in range(20)]
    r = _best_ratio(wg, lo, hi, blocks, ratios, None, None)[..., None]
    symmetric = _quant_range(wg.clamp(lo * r, hi * r), lo * r, hi * r).reshape(N, K)

    def err(q):
        return float(((q - w).double() @ gram * (q - w).double()).sum())

    assert err(fake_quant_int4(clipped, G)) <= err(symmetric) * (1 + 1e-6)
    cg = clipped.reshape(N, -1, G)
    shrink_lo, shrink_hi = cg.amin(2) / wg.amin(2), cg.amax(2) / wg.amax(2)
    assert ((shrink_lo - shrink_hi).abs() > 1e-3).any()


def test_awq_stats_and_input_shapes(problem):
    w, x_cal, _ = problem
    a = awq_search(w, x_cal.reshape(4, -1, K), G)
    xd = x_cal.double()
    b = awq_search_stats(w, xd.t() @ xd, xd.abs().mean(0), x_cal.shape[0], G)
    assert torch.equal(a.scales, b.scales) and torch.equal(a.weight, b.weight)


def test_awq_dead_channels_and_few_samples(problem):
    """Zero input channels and fewer samples than features (a singular Gram matrix)."""
    w, x_cal, _ = problem
    x = x_cal[:100].clone()
    x[:, :7] = 0.0
    res = awq_search(w, x, G)
    assert torch.isfinite(res.weight).all() and torch.isfinite(res.scales).all()
    assert (res.scales > 0).all() and res.loss <= res.rtn_loss
    _, w_eff = awq_weight(res)
    mse = float(((x @ w.t() - x @ w_eff.t()) ** 2).mean())
    assert res.loss == pytest.approx(mse, rel=1e-3)


def test_awq_errors():
    w = torch.randn(8, 96)
    with pytest.raises(ValueError, match="does not divide K=96"):
        awq_search(w, torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="features"):
        awq_search(w, torch.randn(4, 64), 32)
    with pytest.raises(ValueError, match="max_shrink"):
        awq_search(w, torch.randn(4, 96), 32, max_shrink=0.0)


# ---------------------------------------------------------------------------------------------
# GPTQ on the per-channel int8 and fp8 grids (int8-wo, int8-sq, fp8)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_gptq_channel_grids_beat_rtn_held_out(problem, kind):
    from llm_engine.builder.quant.linear import _gptq_channel

    w, x_cal, x_test = problem
    q, scale = _gptq_channel(w, hessian(x_cal).float(), kind)
    quantize, dequantize = (Q.quantize_int8_channel, Q.dequantize_int8_channel) if kind == "int8" \
        else (Q.quantize_fp8_channel, Q.dequantize_fp8_channel)
    rq, rscale = quantize(w)
    assert q.dtype == rq.dtype and q.shape == rq.shape
    assert torch.equal(scale, rscale)  # the stored format and its scales are RTN's
    w_hat = dequantize(q, scale)
    ratio = rel_err(w, w_hat, x_test) / rel_err(w, dequantize(rq, rscale), x_test)
    assert ratio < 0.6, f"GPTQ / RTN held-out error on the {kind} grid: {ratio:.3f}"  # 0.33 measured
