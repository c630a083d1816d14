"""GPTQ (Frantar et al., 2022) for the int4 group format of `kernels.quant`.

Quantizes W [N, K] (torch linear layout, y = x @ W^T) column by column, feeding each column's
rounding error back into the columns not yet quantized so that the layer OUTPUT error on the
calibration inputs, trace((W - Ŵ) H (W - Ŵ)^T) with H = X^T X, is (approximately) minimised.
Pure torch; the result is exactly what `kernels.quant.quantize_int4_group` returns (packed
nibbles, fp32 scales and zero points), so every consumer of that format takes it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llm_engine.kernels.quant import INT4_MAX, int4_codes, int4_range, int4_range_params, pack_int4

__all__ = ["gptq_quantize", "gptq_rounded", "hessian_error"]


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace((W - Ŵ) H (W - Ŵ)^T) in float64: with H = X^T X this is ||X W^T - X Ŵ^T||_F^2."""
    d = (w.double() - w_hat.double())
    return float(((d @ hessian.double()) * d).sum())


def _check_shapes(w: torch.Tensor, hessian: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"gptq: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    K = w.shape[1]
    if tuple(hessian.shape) != (K, K):
        raise ValueError(f"gptq: hessian must be [K, K] = [{K}, {K}], got {tuple(hessian.shape)}")


def _working_copies(w: torch.Tensor, hessian: torch.Tensor) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W float32 and H float64 copies to update in place, and the dead columns (H[i, i] <= 0:
    the input is always 0 there)."""
    W = w.detach().float().clone()
    H = hessian.detach().to(torch.float64).clone()
    if not torch.isfinite(H).all() or not torch.isfinite(W).all():
        raise ValueError("gptq: w and hessian must be finite")
    return W, H, torch.diagonal(H) <= 0


def _error_feedback(W: torch.Tensor, U: torch.Tensor, bs: int,
                    quantize_column: Callable[[int, torch.Tensor, int], torch.Tensor]) -> None:
    """GPTQ's column loop over W [N, K] (columns in quantization order; U the upper Cholesky
    factor of H^-1 in that order), in lazy batches of `bs` columns.

    quantize_column(col, W1, i) quantizes column `col` = W1[:, i] of the current batch W1 (the
    batch as updated so far, for rules that look ahead within it) and returns its dequantized
    value; its rounding error, scaled by U, is pushed onto the columns not yet quantized."""
    N, K = W.shape
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty(N, i2 - i1, dtype=torch.float32)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            wc = W1[:, i]
            err = (wc - quantize_column(i1 + i, W1, i)) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            E1[:, i] = err
        if i2 < K:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in float64.

    If H is not positive definite at `damp` (a rank-deficient H from few samples), the
    dampening is raised tenfold until it is (at most to damp = 10, i.e. H + 10 * mean(diag) I).
    """
    n = h.shape[0]
    eye = torch.eye(n, dtype=h.dtype)
    mean_diag = float(torch.diagonal(h).mean())
    d = damp
    while True:
        chol, info = torch.linalg.cholesky_ex(h + (d * mean_diag) * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        if d >= 10.0:
            raise ValueError(f"gptq: the Hessian is not positive definite even with damp={d}")
        d = max(d * 10.0, 1e-6)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    group_params: tuple[torch.Tensor, torch.Tensor] | None = None,
    integer_zeros: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-quantize w [N, K] to int4 groups of `group_size` columns, given H = X^T X [K, K].

    Returns (packed uint8 [N, K // 2], scales float32 [N, K // G], zeros float32 [N, K // G]),
    the format of `kernels.quant.quantize_int4_group` / `dequantize_int4_group`.

    * hessian: sum over calibration rows x [K] of x x^T (any positive multiple: it is normalised
      here). Accumulate it in float64. Columns with H[i, i] == 0 ("dead": the input is always 0
      there) get weight 0, which costs nothing on such inputs.
    * damp: H += damp * mean(diag H) * I before inverting (raised automatically, tenfold at a
      time, if H is still not positive definite).
    * block_size: columns per lazy batch update (rounded up to a multiple of G so groups never
      straddle blocks: group parameters then always see fully updated weights).
    * act_order: quantize columns in order of descending diag(H) (most active inputs first).
      Groups stay defined on the original column order, with their scale/zero computed up front
      from the original W ("static groups", as AutoGPTQ's static_groups / TensorRT-LLM), so the
      stored format is the plain per-group one. Without act_order, each group's scale/zero is
      computed when its first column is reached, from the weights as updated so far.
    * group_params: (scales [N, K // G], zeros [N, K // G], zeros in [0, 15]) to use
      for every group instead of the min/max rule (e.g. ranges from AWQ's clip search); they
      are static, whatever act_order, and are returned as given.
    * integer_zeros: zero points rounded to integers and returned as uint8, as
      `quantize_int4_group(..., integer_zeros=True)` (given group_params must be integers).

    Works in float32, with the Hessian inverse and its Cholesky factor computed in float64.
    """
    _check_shapes(w, hessian)
    N, K = w.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(
            f"gptq: group size {group_size} does not divide K={K}; "
            f"use kernels.quant.resolve_group_size(K, {group_size})"
        )
    if K % 2:
        raise ValueError(f"gptq: int4 packing needs an even K, got K={K}")
    if not damp > 0:
        raise ValueError(f"gptq: damp must be > 0, got {damp}")
    G = group_size
    bs = -(-max(block_size, 1) // G) * G

    ng = K // G
    if group_params is not None:
        s_static, z_static = (t.detach().float().clone() for t in group_params)
        if tuple(s_static.shape) != (N, ng) or tuple(z_static.shape) != (N, ng):
            raise ValueError(f"gptq: group_params must be two [N, K // G] = [{N}, {ng}] tensors")
        if not (s_static > 0).all() or not ((z_static >= 0) & (z_static <= INT4_MAX)).all():
            raise ValueError("gptq: group_params need scales > 0 and zeros in [0, 15]")
        if integer_zeros and not torch.equal(z_static, z_static.round()):
            raise ValueError("gptq: integer_zeros needs integer zeros in group_params")

    W, H, dead = _working_copies(w, hessian)
    diag = torch.diagonal(H)
    if bool(dead.all()):
        # No information at all: every input is zero; any weight is exact. Store the codes
        # nearest 0.
        if group_params is None:
            scales, zeros = torch.ones(N, ng), torch.zeros(N, ng)
        else:
            scales, zeros = s_static, z_static
        q = int4_codes(torch.zeros(N, K), scales.repeat_interleave(G, dim=1),
                       zeros.repeat_interleave(G, dim=1))  # the code nearest 0
        return pack_int4(q), scales, (zeros.to(torch.uint8) if integer_zeros else zeros)
    H = H / diag[~dead].mean()  # normalise (GPTQ is invariant to the scale of H)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static = act_order or group_params is not None
    if group_params is None and act_order:
        # Static groups from the original (dead-zeroed) weights.
        s_static, z_static = int4_range_params(*int4_range(W.reshape(N, ng, G)),
                                               integer_zeros)  # [N, ng]
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(K)
    col_group = perm // G  # group of each (permuted) column
    if not static:
        s_dyn = torch.empty(N, ng, dtype=torch.float32)
        z_dyn = torch.empty(N, ng, dtype=torch.float32)

    U = _inverse_cholesky(H, damp).to(torch.float32)  # upper, [K, K]

    Q = torch.empty(N, K, dtype=torch.float32)
    scale = zero = None

    def quantize_column(col: int, W1: torch.Tensor, i: int) -> torch.Tensor:
        nonlocal scale, zero
        if static:
            g = int(col_group[col])
            scale, zero = s_static[:, g], z_static[:, g]
        elif col % G == 0:
            scale, zero = int4_range_params(*int4_range(W1[:, i:i + G]), integer_zeros)
            s_dyn[:, col // G], z_dyn[:, col // G] = scale, zero
        q = int4_codes(W1[:, i], scale, zero)
        Q[:, col] = q
        return (q - zero) * scale

    _error_feedback(W, U, bs, quantize_column)

    if act_order:
        q_orig = torch.empty_like(Q)
        q_orig[:, perm] = Q
        Q = q_orig
    if static:
        scales, zeros = s_static, z_static
    else:
        scales, zeros = s_dyn, z_dyn
    zeros = zeros.to(torch.uint8) if integer_zeros else zeros
    return pack_int4(Q.to(torch.uint8)), scales.contiguous(), zeros.contiguous()


def gptq_rounded(
    w: torch.Tensor,
    hessian: torch.Tensor,
    rounder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> torch.Tensor:
    """GPTQ for any format whose grid is fixed per column before quantizing (per-channel int8,
    per-channel fp8): returns Ŵ [N, K] float32, every column of it the rounder's output.

    rounder(cols, wc): cols [n] original column indices, wc [N, n] columns as updated so far ->
    the dequantized grid values (the caller re-derives the stored codes from Ŵ, exactly, with
    the same per-row scales). Same error feedback and lazy batches as `gptq_quantize`."""
    _check_shapes(w, hessian)
    N, K = w.shape
    W, H, dead = _working_copies(w, hessian)
    diag = torch.diagonal(H)
    if bool(dead.all()):
        return rounder(torch.arange(K), W)
    H = H / diag[~dead].mean()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order \
        else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp).to(torch.float32)
    Q = torch.empty(N, K, dtype=torch.float32)

    def quantize_column(col: int, W1: torch.Tensor, i: int) -> torch.Tensor:
        Q[:, col] = rounder(perm[col:col + 1], W1[:, i:i + 1])[:, 0]
        return Q[:, col]

    _error_feedback(W, U, max(block_size, 1), quantize_column)
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out
