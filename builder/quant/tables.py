"""Embedding tables and LM heads: one int8 table per row each (`kernels.formats` "int8_channel"),
shared by the embedding and a tied head. The head is the most sensitive GEMM, and 4-bit there
costs more quality than it saves, so every mode stores tables this way.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from llm_engine.builder.ir import Graph, Node
from llm_engine.builder.quant import calibrate as cal
from llm_engine.builder.quant.config import TABLE_FORMAT
from llm_engine.builder.quant.folds import Exclusions, Weights
from llm_engine.builder.quant.quality import output_error
from llm_engine.kernels import quant as Q
from llm_engine.kernels.quant_linear import int8_linear


def kept_tables(graph: Graph, tables: dict[str, list[Node]],
                 excluded: Exclusions) -> dict[str, list[Node]]:
    """The tables to quantize: those read only by embeddings and linears, and not excluded."""
    keep = {}
    for wnode_name, users in tables.items():
        wnode = graph.node(wnode_name)
        origins = [*wnode.origin, *(o for u in users for o in u.origin)]
        if not excluded([wnode.attrs["name"], *origins]) and \
                all(u.op in ("embedding", "linear") for u in users):
            keep[wnode_name] = users
    return keep


def quantize_tables(graph: Graph, w: Weights, tables: dict[str, list[Node]],
                     calib: cal.Calibration) -> dict[str, dict]:
    """Embedding tables and LM heads -> one int8 per-row table each, shared by its users."""
    report = {}
    for wnode_name, users in tables.items():
        wnode = graph.node(wnode_name)
        name = wnode.attrs["name"]
        W = w.values[name].float()
        q, scale = Q.quantize_int8_channel(W)
        qn = w.add(f"{name}.int8", q, wnode.origin)
        sn = w.add(f"{name}.scale", scale, wnode.origin)
        entry: dict[str, Any] = {"format": TABLE_FORMAT, "used_by": sorted(u.op for u in users)}
        for u in users:
            if u.op == "embedding":
                graph.set_inputs(u, [qn.name, u.inputs[1], sn.name])
                u.attrs.update({"b_format": TABLE_FORMAT, "dtype": u.dtype})
            else:
                x_stats = calib.acts.get(u.inputs[0])
                graph.set_inputs(u, [u.inputs[0], qn.name, sn.name, *u.inputs[2:]])
                u.attrs["b_format"] = TABLE_FORMAT
                if x_stats is not None and x_stats.sample is not None:
                    x = x_stats.sample.float()
                    entry["output_rel_error"] = round(output_error(
                        F.linear(x, W), int8_linear(x, q, scale)), 6)
                    entry["act_absmax"] = round(x_stats.absmax.max().item(), 4)
        deq = Q.dequantize_int8_channel(q, scale)
        entry["weight_rel_error"] = round(((deq - W).norm() / W.norm().clamp_min(1e-30)).item(), 6)
        entry["weight_scale"] = {"min": scale.min().item(), "max": scale.max().item()}
        report[name] = entry
    return report


