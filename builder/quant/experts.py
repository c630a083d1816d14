"""Quantize the experts of mixture-of-experts blocks: each expert's gate/up and down weights
in a weight-only format, from that expert's own calibration rows.

A `moe` node holds every expert of a layer in two stacked weights ([E, 2I, H] and
[E, H, I]). Each expert is quantized on its own, like a linear, from the inputs calibration
routed to it (`calibrate.expert_key`): the rows that chose it for gate/up, their gated
activations for down. The stored parts are the format's, stacked over the experts.

- int4 modes: `int4_group` with integer zero points (onnxruntime's QMoE reads uint8 zero
  points) and one power-of-two group size dividing both H and I (QMoE has one block size
  for both GEMMs). AWQ's per-group clip search on the expert's rows picks the ranges; its
  per-channel scales are not searched, since the GEMM's input is shared with the router and
  every other expert, so there is nowhere exact to fold them. int4-gptq adds GPTQ's error
  feedback within those ranges.
- int8 and fp8 modes: `int8_channel` (weight-only, one scale per output channel), rounded
  with GPTQ's error feedback. Experts dominate a MoE model's weights and run as
  memory-bound GEMVs at decode, so weight-only int8 keeps the byte savings; per-token
  activation quantization (int8-sq, fp8) is left to the dense GEMMs.

An expert that no calibration token reached is rounded to nearest (data-free); the report
counts the rows each expert saw.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_engine.builder.quant import calibrate as cal
from llm_engine.builder.quant.config import INT4_MODES, QuantConfig
from llm_engine.builder.quant.folds import Weights
from llm_engine.builder.quant.quality import output_error
from llm_engine.kernels import formats
from llm_engine.kernels import quant as Q

# onnxruntime's QMoE takes power-of-two blocks of K from 16 up.
EXPERT_GROUPS = (256, 128, 64, 32, 16)


def expert_group(hidden: int, inter: int, requested: int) -> int | None:
    """The largest power-of-two group <= requested dividing both GEMMs' K, or None."""
    for g in EXPERT_GROUPS:
        if g <= max(requested, 16) and hidden % g == 0 and inter % g == 0:
            return g
    return None


def _int4(W: torch.Tensor, stats: cal.ActStats, group: int, gptq: bool) -> list[torch.Tensor]:
    """(packed, scales, zeros as uint8) of one expert's W [N, K]."""
    q, scales, zeros = _int4_parts(W, stats, group, gptq)
    return [q, scales, zeros.round().clamp(0, Q.INT4_MAX).to(torch.uint8)]


def _int4_parts(W: torch.Tensor, stats: cal.ActStats, group: int, gptq: bool):
    if stats.rows == 0 or stats.hessian is None:
        return Q.quantize_int4_group(W, group, integer_zeros=True)
    from llm_engine.builder.quant.awq import awq_search_stats
    from llm_engine.builder.quant.gptq import gptq_quantize

    hessian = stats.hessian.double()
    clipped = awq_search_stats(W, hessian, stats.absmean, stats.rows, group,
                               search_scales=False, integer_zeros=True).weight
    parts = Q.quantize_int4_group(clipped, group, integer_zeros=True)
    if not gptq:
        return parts
    return gptq_quantize(W, stats.hessian.float(), group, group_params=parts[1:],
                         integer_zeros=True)


def _int8(W: torch.Tensor, stats: cal.ActStats) -> list[torch.Tensor]:
    if stats.rows == 0 or stats.hessian is None:
        return list(Q.quantize_int8_channel(W))
    from llm_engine.builder.quant.linear import _gptq_channel

    return list(_gptq_channel(W, stats.hessian.float(), "int8"))


def _expert_error(W: torch.Tensor, parts: list[torch.Tensor], fmt: str, group: int,
                  stats: cal.ActStats) -> float | None:
    if stats.sample is None or not len(stats.sample):
        return None
    x = stats.sample.float()
    y = formats.get(fmt).linear(x, *parts, group_size=group or None)
    return output_error(x @ W.t(), y)


def quantize_experts(w: Weights, calib: cal.Calibration, config: QuantConfig
                     ) -> dict[str, dict[str, Any]]:
    """Quantize every float `moe` node's experts in place; returns one report entry per
    layer (format, group, calibration rows per expert, output errors)."""
    graph = w.graph
    int4 = config.mode in INT4_MODES
    report: dict[str, dict[str, Any]] = {}
    for name, (experts, hidden, inter) in cal.expert_inputs(graph).items():
        node = graph.node(name)
        fmt, group = "int8_channel", 0
        if int4:
            group = expert_group(hidden, inter, config.group) or 0
            if group:
                fmt = "int4_group"
        stored: list[list[list[torch.Tensor]]] = []  # [gate_up, down] -> experts -> parts
        rows, errors = [], []
        for which, wname in (("gate_up", node.inputs[3]), ("down", node.inputs[4])):
            W_all = w.values[graph.node(wname).attrs["name"]].float()
            per_expert = []
            for e in range(experts):
                stats = calib.acts[cal.expert_key(name, e, which)]
                W = W_all[e]
                parts = (_int4(W, stats, group, config.mode == "int4-gptq")
                         if fmt == "int4_group" else _int8(W, stats))
                per_expert.append(parts)
                if which == "gate_up":
                    rows.append(stats.rows)
                err = _expert_error(W, parts, fmt, group, stats)
                if err is not None:
                    errors.append(err)
            stored.append(per_expert)
        wnode = graph.node(node.inputs[3])
        inputs = []
        for which, per_expert in zip(("gate_up", "down"), stored, strict=True):
            base = graph.node(node.inputs[3 if which == "gate_up" else 4]).attrs["name"]
            for i, part in enumerate(formats.get(fmt).parts):
                tensor = torch.stack([p[i] for p in per_expert])
                inputs.append(w.add(f"{base}.{part.suffix}", tensor, wnode.origin).name)
        graph.set_inputs(node, [*node.inputs[:3], *inputs, *node.inputs[5:]])
        node.attrs["w_format"] = fmt
        if group:
            node.attrs["group_size"] = group
        report[name] = {
            "format": fmt, **({"group_size": group} if group else {}),
            "experts": experts,
            "calibration_rows": rows,
            "experts_without_calibration": sum(1 for r in rows if r == 0),
            "output_rel_error": {"mean": round(sum(errors) / len(errors), 6),
                                 "max": round(max(errors), 6)} if errors else None,
        }
    return report
