"""Quantize one group of linears (those reading one activation) in the build's mode: the
smoothing or AWQ scales folded into the activation's producer, the stored parts of each
weight in its format (`kernels.formats`), rounded to nearest or with GPTQ's error feedback,
and what the report shows of each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from llm_engine.builder.quant import calibrate as cal
from llm_engine.builder.quant.config import (
    GPTQ_MODES,
    INT4_MODES,
    QuantConfig,
    fp8_group_for,
    group_size_for,
)
from llm_engine.builder.quant.folds import Group, Weights
from llm_engine.builder.quant.quality import output_error
from llm_engine.kernels import formats, ops
from llm_engine.kernels import quant as Q


def _smoothquant_scales(x_absmax: torch.Tensor, W: torch.Tensor, alpha: float,
                        tie: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    w_absmax = W.abs().amax(0)
    s = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    s = torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s if tie is None else tie(s.log()).exp()  # geometric mean over tied channels


SQ_ALPHAS = tuple(round(0.3 + 0.05 * i, 2) for i in range(12))  # 0.30 .. 0.85


def _search_alpha(x: torch.Tensor, x_absmax: torch.Tensor, W: torch.Tensor,
                  tie: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """The migration strength that minimises the W8A8 output error on the calibration rows."""
    y_ref = F.linear(x, W)
    best, best_err = SQ_ALPHAS[0], float("inf")
    for alpha in SQ_ALPHAS:
        s = _smoothquant_scales(x_absmax, W, alpha, tie)
        q, scale = Q.quantize_int8_channel(W * s)
        err = output_error(y_ref, Q.int8_a8_linear_reference(x / s, q, scale))
        if err < best_err:
            best, best_err = alpha, err
    return best


def _quantize_rows(mode: str, W: torch.Tensor, group: int, stats: cal.ActStats,
                   x_scale: torch.Tensor | None, hessian: torch.Tensor | None,
                   integer_zeros: bool = False) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The stored operands of W [N, K] in the mode's format (fp8: x_scale None means
    per-token activation scales), and what to report."""
    if mode in ("int8-wo", "int8-sq"):
        q, scale = _gptq_channel(W, hessian, "int8") if hessian is not None else \
            Q.quantize_int8_channel(W)
        return [q, scale], {"rounding": "gptq" if hessian is not None else "nearest"}
    if mode == "fp8":
        q, scale = _gptq_channel(W, hessian, "fp8") if hessian is not None else \
            Q.quantize_fp8_channel(W)
        rounding = {"rounding": "gptq" if hessian is not None else "nearest"}
        if x_scale is None:
            return [q, scale], rounding
        return [q, scale, x_scale], {"x_scale": x_scale.item(), **rounding}
    if mode == "int4-gptq":
        from llm_engine.builder.quant.awq import awq_search_stats
        from llm_engine.builder.quant.gptq import gptq_quantize

        # Group ranges from AWQ's clip search (per-group shrink that minimises the output
        # error on all calibration rows), then GPTQ's error feedback within those ranges.
        clipped = awq_search_stats(W, hessian.double(), stats.absmean, stats.rows, group,
                                   search_scales=False, integer_zeros=integer_zeros).weight
        _, scales, zeros = Q.quantize_int4_group(clipped, group, integer_zeros)
        return list(gptq_quantize(W, hessian, group, group_params=(scales, zeros),
                                  integer_zeros=integer_zeros)), {"group_size": group}
    return list(Q.quantize_int4_group(W, group, integer_zeros)), {"group_size": group}


def _gptq_channel(W: torch.Tensor, hessian: torch.Tensor, kind: str) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel int8 or fp8 codes of W [N, K] with GPTQ's error feedback: the row scales are
    plain round-to-nearest's (amax / qmax), and each column's rounding error is pushed onto the
    columns not yet rounded through the calibration Hessian."""
    from llm_engine.builder.quant.gptq import gptq_rounded

    quantize = Q.quantize_int8_channel if kind == "int8" else Q.quantize_fp8_channel
    _, scale = quantize(W)
    col = scale[:, None]
    if kind == "int8":
        def rounder(_cols, wc):
            return (wc / col).round().clamp(-Q.INT8_MAX, Q.INT8_MAX) * col
    else:
        fp8 = torch.float8_e4m3fn

        def rounder(_cols, wc):
            return (wc / col).clamp(-Q.FP8_E4M3_MAX, Q.FP8_E4M3_MAX).to(fp8).float() * col
    w_hat = gptq_rounded(W, hessian, rounder)
    codes = (w_hat / col).clamp(-Q.FP8_E4M3_MAX, Q.FP8_E4M3_MAX)
    q = codes.round().to(torch.int8) if kind == "int8" else codes.to(torch.float8_e4m3fn)
    return q, scale


def quantize_group(g: Group, w: Weights, calib: cal.Calibration, config: QuantConfig
                   ) -> dict[str, dict[str, Any]]:
    """Quantize the group's linears in place (their weights become the format's parts) and
    return the report entry of each weight."""
    mode = config.mode
    graph = w.graph
    nodes = [graph.node(n) for n in g.linears]
    wnodes = [graph.producer(n, 1) for n in nodes]
    names = [wn.attrs["name"] for wn in wnodes]
    W0 = torch.cat([w.values[n].float() for n in names])
    K = W0.shape[1]
    stats = calib.acts[g.act]
    x = stats.sample.float()
    fmt = config.weight_format
    integer_zeros = config.integer_zeros
    group = 0
    if mode in INT4_MODES:
        group = group_size_for(K, config.group)
    elif fmt == "fp8_channel_a8_group":
        group = fp8_group_for(K, config.group) or 0
    s = None
    extra: dict[str, Any] = {}
    W = W0
    if mode == "int8-sq" and g.fold is not None:
        alpha = config.smoothquant_alpha
        if alpha == "auto":
            alpha = _search_alpha(x, stats.absmax, W0, g.tie)
        s = _smoothquant_scales(stats.absmax, W0, alpha, g.tie)
        W = W0 * s
        extra["smoothquant_alpha"] = alpha
    elif mode == "int4-awq":
        from llm_engine.builder.quant.awq import awq_search_stats

        # The search scores candidates on every calibration row (their Gram matrix), not on
        # the row sample: a few hundred rows against K up to 1536 inputs overfit the scales
        # and clip ranges to the sample.
        # o_proj's V-rows fold is left to SmoothQuant: AWQ's tied scales there lowered the
        # calibration error but raised held-out perplexity (+14.1% vs +13.0% on SmolLM2).
        res = awq_search_stats(W0, stats.hessian, stats.absmean, stats.rows, group,
                               search_scales=g.fold is not None and g.tie is None,
                               integer_zeros=integer_zeros)
        W = res.weight
        if g.fold is not None and not torch.all(res.scales == 1):
            s = res.scales.float()
        extra["awq_loss_vs_rtn"] = round(res.loss / max(res.rtn_loss, 1e-30), 4)
    if s is not None:
        g.fold(s)
        extra["smoothing"] = {"min": round(s.min().item(), 5), "max": round(s.max().item(), 5)}
    x_scale = None
    if fmt == "fp8_channel_a8":
        x_scale = (stats.absmax.max().clamp_min(1e-12) / Q.FP8_E4M3_MAX).reshape(1).float()
    hessian = stats.hessian.float() if mode in GPTQ_MODES else None
    if hessian is not None and s is not None:  # x / s: H_ij / (s_i s_j)
        hessian = hessian / (s[:, None] * s[None, :])
    xq = x if s is None else x / s
    report: dict[str, dict[str, Any]] = {}
    row = 0
    for node, wnode, name in zip(nodes, wnodes, names, strict=True):
        n = w.values[name].shape[0]
        Wi, W0i = W[row:row + n], W0[row:row + n]
        row += n
        operands, info = _quantize_rows(mode, Wi, group, stats, x_scale, hessian,
                                        integer_zeros)
        if fmt == "fp8_channel_a8_group":
            info["group_size"] = group
        parts = [w.add(f"{name}.{p.suffix}", t, wnode.origin)
                 for p, t in zip(formats.get(fmt).parts, operands, strict=True)]
        bias = node.inputs[2:]
        graph.set_inputs(node, [node.inputs[0], *(p.name for p in parts), *bias])
        node.attrs["b_format"] = fmt
        if group:
            node.attrs["group_size"] = group
        deq = formats.get(fmt).dequantize(*operands, group_size=group)
        attrs = {"b_format": fmt, **({"group_size": group} if group else {})}
        y_ref = F.linear(x, W0i)
        y_q = ops.linear(xq, *operands, **attrs)
        if fmt == "int4_group":  # what plain round-to-nearest would have given, for the report
            rtn = Q.quantize_int4_group(W0i, group, integer_zeros)
            info["rtn_output_rel_error"] = round(output_error(y_ref, ops.linear(x, *rtn, **attrs)), 6)
        scales = operands[1].float()
        report[name] = {
            "format": fmt, **info, **extra,
            "weight_rel_error": round(((deq - Wi).norm() / Wi.norm().clamp_min(1e-30)).item(), 6),
            "output_rel_error": round(output_error(y_ref, y_q), 6),
            "act_absmax": round(stats.absmax.max().item(), 4),
            "act_absmean": round(stats.absmean.mean().item(), 5),
            "weight_scale": {"min": scales.min().item(), "max": scales.max().item()},
        }
    return report


