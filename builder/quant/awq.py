"""AWQ, activation-aware weight quantization (Lin et al., 2023), for the int4 group format.

For one linear W [N, K] (or several sharing one input, concatenated along N) and a sample of
its inputs x [M, K]:

1. Scale search: s = mean|x|^alpha per input channel, normalised by sqrt(max(s) * min(s)),
   for alpha in {0, 1/grid, ..., (grid-1)/grid}; keep the alpha whose Q(W * s) / s gives the
   smallest output error ||x W^T - x (Q(W * s) / s)^T||^2 on the sample. alpha = 0 is s = 1
   (plain round-to-nearest), so the search never does worse than RTN on the sample.
2. Clip search: per output row and group of W * s, shrink the group's [min, max] range by
   ratios 1.0 down to `max_shrink` and keep, per (row, group), the ratio minimising that
   group's own contribution to the output error on the (scaled) sample x / s.

The caller folds 1/s into whatever produces x (the preceding norm or linear) and quantizes
`AwqResult.weight` with plain `kernels.quant.quantize_int4_group`.

All output errors are computed from the Gram matrix X^T X (float64) rather than from x itself:
||x ΔW^T||^2 = trace(ΔW X^T X ΔW^T) = ||ΔW L||^2 with L L^T = X^T X (Cholesky, computed once),
which costs N K^2 per candidate instead of M N K. So the statistics can also be accumulated in
a streaming way and passed to `awq_search_stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llm_engine.kernels.quant import int4_codes, int4_range, int4_range_params

__all__ = ["AwqResult", "awq_search", "awq_search_stats", "fake_quant_int4"]


@dataclass
class AwqResult:
    """scales: s [K] float32 (ones when the scale search is off or picked alpha = 0);
    weight: W * s [N, K] float32 with the clipping applied; quantize it with
    `quantize_int4_group` (the caller divides x by s). alpha: the chosen exponent.
    loss / rtn_loss: output mean squared error on the sample (per element of x W^T) of the
    chosen quantization and of plain RTN."""

    scales: torch.Tensor
    weight: torch.Tensor
    alpha: float
    loss: float
    rtn_loss: float


def fake_quant_int4(w: torch.Tensor, group_size: int, integer_zeros: bool = False
                    ) -> torch.Tensor:
    """Q(w): round-to-nearest int4 per group, dequantized (same values as
    dequantize_int4_group(*quantize_int4_group(w, G, integer_zeros), G), computed without
    packing)."""
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    return _quant_range(g, *int4_range(g, keepdim=True), integer_zeros).reshape(N, K)


def _quant_range(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, integer: bool = False
                 ) -> torch.Tensor:
    """g [..., G] quantized with the range [lo, hi] (lo <= 0 <= hi, broadcast [..., 1]) and the
    rule of quantize_int4_group, dequantized."""
    scale, zero = int4_range_params(lo, hi, integer)
    return (int4_codes(g, scale, zero) - zero) * scale


def _gram_factor(gram: torch.Tensor) -> torch.Tensor:
    """L [K, K] float32 with L L^T = Gram (+ a negligible jitter if Gram is singular), so that
    trace(dW Gram dW^T) = ||dW L||_F^2: a sum of squares, exact to float32 rounding."""
    gram = gram.double()
    mean_diag = float(torch.diagonal(gram).mean())
    if mean_diag <= 0:
        return torch.zeros_like(gram, dtype=torch.float32)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    jitter = 0.0
    while True:
        chol, info = torch.linalg.cholesky_ex(gram + (jitter * mean_diag) * eye)
        if int(info) == 0:
            return chol.float()
        jitter = 1e-10 if jitter == 0.0 else jitter * 10.0


def _out_err(dw: torch.Tensor, factor: torch.Tensor, chunk: int) -> float:
    """trace(dW Gram dW^T) = ||dW L||^2 (L from `_gram_factor`), N processed in chunks."""
    total = 0.0
    for n0 in range(0, dw.shape[0], chunk):
        total += float((dw[n0:n0 + chunk].float() @ factor).double().pow(2).sum())
    return total


def _check(w: torch.Tensor, K_x: int, group_size: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"awq: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    K = w.shape[1]
    if K_x != K:
        raise ValueError(f"awq: activations have {K_x} features but w has K={K}")
    if group_size <= 0 or K % group_size:
        raise ValueError(
            f"awq: group size {group_size} does not divide K={K}; "
            f"use kernels.quant.resolve_group_size(K, {group_size})"
        )


def awq_search(
    w: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    *,
    grid: int = 20,
    search_scales: bool = True,
    clip: bool = True,
    max_shrink: float = 0.5,
    n_clip_grid: int = 20,
    chunk: int = 1024,
    integer_zeros: bool = False,
) -> AwqResult:
    """AWQ for w [N, K] given sample inputs x [M, K] (any leading dims: flattened to rows).

    See the module doc. `grid`: number of alphas tried; `n_clip_grid`: number of shrink ratios
    tried, evenly from 1.0 down to `max_shrink`; `chunk`: output rows per step (memory bound);
    `integer_zeros`: score candidates with integer zero points (`quantize_int4_group`'s).
    """
    x2 = x.reshape(-1, x.shape[-1])
    _check(w, x2.shape[1], group_size)
    xd = x2.detach().double()
    gram = xd.t() @ xd
    return awq_search_stats(
        w, gram, xd.abs().mean(dim=0), x2.shape[0], group_size, grid=grid,
        search_scales=search_scales, clip=clip, max_shrink=max_shrink,
        n_clip_grid=n_clip_grid, chunk=chunk, integer_zeros=integer_zeros,
    )


def awq_search_stats(
    w: torch.Tensor,
    gram: torch.Tensor,
    x_abs_mean: torch.Tensor,
    n_rows: int,
    group_size: int,
    *,
    grid: int = 20,
    search_scales: bool = True,
    clip: bool = True,
    max_shrink: float = 0.5,
    n_clip_grid: int = 20,
    chunk: int = 1024,
    integer_zeros: bool = False,
) -> AwqResult:
    """`awq_search` from accumulated statistics of the inputs: gram = sum of x x^T [K, K]
    (float64), x_abs_mean = mean |x| per channel [K], n_rows = number of rows summed."""
    _check(w, gram.shape[0], group_size)
    if grid < 1 or n_clip_grid < 1:
        raise ValueError(f"awq: grid ({grid}) and n_clip_grid ({n_clip_grid}) must be >= 1")
    if not 0.0 < max_shrink <= 1.0:
        raise ValueError(f"awq: max_shrink must be in (0, 1], got {max_shrink}")
    W = w.detach().float()
    N, K = W.shape
    gram = gram.detach().double()
    denom = max(n_rows, 1) * N  # -> mean squared error per output element

    factor = _gram_factor(gram)
    rtn_sum = _out_err(W - fake_quant_int4(W, group_size, integer_zeros), factor, chunk)
    best_alpha, best_sum = 0.0, rtn_sum
    s = torch.ones(K)
    if search_scales:
        xm = x_abs_mean.detach().double().clamp(min=1e-8)
        for i in range(1, grid):
            alpha = i / grid
            cand = xm.pow(alpha)
            cand = (cand / math.sqrt(float(cand.max() * cand.min()))).float()
            dw = W - fake_quant_int4(W * cand, group_size, integer_zeros) / cand
            err = _out_err(dw, factor, chunk)
            if err < best_sum:  # strict: ties keep the smaller alpha (alpha 0 = RTN)
                best_alpha, best_sum, s = alpha, err, cand

    ws = W * s
    if clip:
        # Gram of the scaled inputs x / s: diag(1/s) Gram diag(1/s).
        inv = 1.0 / s.double()
        gram_s = gram * inv[:, None] * inv[None, :]
        ws_clipped = _clip_search(ws, gram_s, group_size, max_shrink, n_clip_grid, chunk,
                                  integer_zeros)
        err = _out_err(W - fake_quant_int4(ws_clipped, group_size, integer_zeros) / s, factor,
                       chunk)
        if err < best_sum:
            ws, best_sum = ws_clipped, err
    return AwqResult(scales=s, weight=ws, alpha=best_alpha, loss=best_sum / denom,
                     rtn_loss=rtn_sum / denom)


def _clip_search(
    ws: torch.Tensor, gram: torch.Tensor, G: int, max_shrink: float, n_grid: int, chunk: int,
    integer_zeros: bool = False,
) -> torch.Tensor:
    """ws [N, K] clamped per (row, group) to the shrunk range [r * lo, r * hi] minimising
    the group's own output error dW_g Gram_gg dW_g^T (lo/hi: the group's range widened to 0)."""
    N, K = ws.shape
    ng = K // G
    # Diagonal blocks of the Gram matrix, [ng, G, G], in float32 (errors are compared, not summed
    # across groups, so float32 suffices; scaled to O(1) to stay well inside its range).
    blocks = torch.stack([gram[g * G:(g + 1) * G, g * G:(g + 1) * G] for g in range(ng)])
    blocks = (blocks / blocks.diagonal(dim1=1, dim2=2).mean().clamp(min=1e-300)).float()
    ratios = [1.0 - (1.0 - max_shrink) * i / max(n_grid - 1, 1) for i in range(n_grid)]
    if n_grid == 1:
        ratios = [1.0]
    out = torch.empty_like(ws)
    for n0 in range(0, N, chunk):
        wg = ws[n0:n0 + chunk].reshape(-1, ng, G)  # [n, ng, G]
        lo, hi = int4_range(wg, keepdim=True)
        # The symmetric shrink, then each end on its own (a group's tails are rarely equal).
        r_sym = _best_ratio(wg, lo, hi, blocks, ratios, None, None, integer_zeros)
        r_lo = _best_ratio(wg, lo, hi, blocks, ratios, None, r_sym, integer_zeros)
        r_hi = _best_ratio(wg, lo, hi, blocks, ratios, r_lo, None, integer_zeros)
        out[n0:n0 + chunk] = wg.clamp(lo * r_lo[..., None], hi * r_hi[..., None]).reshape(-1, K)
    return out


def _best_ratio(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, blocks: torch.Tensor,
                ratios: list[float], r_lo: torch.Tensor | None,
                r_hi: torch.Tensor | None, integer_zeros: bool = False) -> torch.Tensor:
    """The shrink ratio per (row, group) [n, ng] minimising the group's output error: of the
    ends given as None (both together when both are), the others kept at their given ratio."""
    best_err = torch.full(wg.shape[:2], float("inf"))
    best_r = torch.ones(wg.shape[:2])
    for r in ratios:
        lo_r = lo * (r if r_lo is None else r_lo[..., None])
        hi_r = hi * (r if r_hi is None else r_hi[..., None])
        d = wg - _quant_range(wg.clamp(lo_r, hi_r), lo_r, hi_r, integer_zeros)  # [n, ng, G]
        err = (torch.einsum("ngi,gij->ngj", d, blocks) * d).sum(dim=2)  # [n, ng]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return best_r
