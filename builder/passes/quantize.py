"""Quantize GEMM weights and the KV cache (`engine build --quant MODE --kv-cache-dtype D`).

Modes (the `linear` b_formats they produce are defined in `kernels.quant`):

- `int8-wo`   int8 weights, one scale per output channel ("int8_channel").
- `int8-sq`   SmoothQuant W8A8: per-input-channel factors s = max|x|^a / max|w|^(1-a) move
              activation outliers into the weights (W * s, x / s), then int8 weights per
              channel and int8 activations per token, dynamic ("int8_channel_a8").
- `fp8`       e4m3 weights per channel and e4m3 activations with one static scale per GEMM
              input from calibration (max|x| / 448) ("fp8_channel_a8"); with
              `--fp8-act-scales per-token`, one scale per token computed at run time
              ("fp8_channel_a8_token"); with `per-token-group`, one per token and group of
              `--group-size` input channels ("fp8_channel_a8_group", see fp8_group_for).
- `int4-awq`  4-bit asymmetric groups; AWQ searches per-input-channel scales and per-group
              clipping on calibration activations ("int4_group").
- `int4-gptq` 4-bit asymmetric groups; GPTQ quantizes column by column, correcting the
              remaining columns with the calibration Hessian ("int4_group").

The 8-bit per-channel modes keep round-to-nearest's scales (amax / qmax per row) but choose each
weight's code with GPTQ's error feedback through the calibration Hessian (GPTQ_MODES): on
SmolLM2 that took fp8 from +3.7% to +2.8% perplexity and int8-sq from +1.2% to +1.0% on
held-out text, for the same stored format.

The 1/s of SmoothQuant and AWQ is folded into whatever produces the GEMM's input where that is
exact: the weight (and bias) of the RMS/Layer norm before q/k/v and gate/up, the `up` rows
of the gate/up GEMM before down (act(gate) * up / s), and for o_proj the V rows of the KV head
each query head reads (so s is tied over the query heads of one KV group; SmoothQuant only).
A GEMM whose input has no such producer gets s = 1. The embedding table and the LM head (one
shared table when tied) are int8 per row in every mode: the head is the most sensitive GEMM and
4-bit there costs more quality than it saves.

Before calibration the model may be rotated (`--rotation`, `builder.quant.rotate`): orthogonal
matrices folded into the weights spread activation outliers over all channels; `auto` does this
for int8-sq, the mode it helps.

Everything is computed here, from the calibration run (`builder.quant.calibrate`); the values go
to the writer as buffers. Afterwards the quantized graph is scored against the unquantized one on
held-out windows, which fills the report and the optional build gates.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph, Node, WeightSpec
from llm_engine.builder.passes.report import PassReport
from llm_engine.builder.quant import calibrate as cal
from llm_engine.builder.quant.calib_data import load_calib_data
from llm_engine.builder.quant.patterns import (
    LAYOUT_OPS,
    attention_v_rows,
    dense_weight_names,
    only_user,
    through_reshapes,
)
from llm_engine.builder.quant.quality import compare, output_error
from llm_engine.builder.quant.rotate import ROTATIONS, is_rotation_linear, rotate
from llm_engine.builder.weights import make_weight
from llm_engine.kernels import ops
from llm_engine.kernels import quant as Q
from llm_engine.kernels.triton.gemm import GROUPED

MODES = ("int8-wo", "int8-sq", "fp8", "int4-awq", "int4-gptq")
KV_DTYPES = {"int8": "int8", "fp8": "float8_e4m3fn"}
KV_QMAX = {"int8": Q.INT8_MAX, "fp8": Q.FP8_E4M3_MAX}
FP8_ACT_SCALES = ("static", "per-token", "per-token-group")
INT4_ZERO_POINTS = ("float", "integer")
FORMAT = {"int8-wo": "int8_channel", "int8-sq": "int8_channel_a8", "fp8": "fp8_channel_a8",
          "int4-awq": "int4_group", "int4-gptq": "int4_group"}
TABLE_FORMAT = "int8_channel"
# Modes whose weights are rounded by GPTQ (error feedback through the calibration Hessian);
# int4-awq rounds to nearest within its searched scales and clip ranges.
GPTQ_MODES = ("int8-wo", "int8-sq", "fp8", "int4-gptq")
# 2048 tokens at the default length; 2 windows (1022 tokens) differed by up to 1.5 points of
# perplexity increase from a 16k-token measurement on held-out text.
HELDOUT_WINDOWS = 4
INT4_KERNEL_GROUPS = (256, 128, 64, 32)
DEFAULT_GROUP = 128


@dataclass
class QuantEnv:
    """What the pass needs beyond the graph: the checkpoint and a place for computed tensors."""

    source: Any  # checkpoint weights (name -> tensor, lazily)
    buffers: dict[str, torch.Tensor]  # traced buffers; computed weights are added here
    tokenizer: Callable[[], Any] | None  # loads the model's tokenizer, or None
    vocab_size: int
    max_seq_len: int
    ui: Any = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Group:
    """The linears that read one activation, and how to fold 1/s into its producer. `tie`
    maps a per-channel [K] tensor to one whose channels are equal wherever the fold needs
    them equal (the query heads sharing a KV head), or is None when every channel is free."""

    act: str
    linears: list[str]
    fold: Callable[[torch.Tensor], None] | None
    tie: Callable[[torch.Tensor], torch.Tensor] | None = None


def has_fp8() -> bool:
    return hasattr(torch, "float8_e4m3fn")


def fp8_group_for(K: int, requested: int) -> int | None:
    """The activation group of an fp8_channel_a8_group GEMM with K inputs: the largest power
    of two <= `requested` that divides K, at least 32 (a GPU kernel's 8-bit dot takes 32
    columns at least; the group is its K tile). None if there is none."""
    g = 1 << (max(requested, 1).bit_length() - 1)
    while g >= 32:
        if K % g == 0:
            return g
        g //= 2
    return None


def group_size_for(K: int, requested: int) -> int:
    """`requested` if it divides K, else the largest power of two >= 32 below it that does
    (the sizes the fast kernels take), else the largest divisor that fits."""
    if K % requested == 0:
        return requested
    for g in INT4_KERNEL_GROUPS:
        if g < requested and K % g == 0:
            return g
    return Q.resolve_group_size(K, requested)


@dataclass
class _Exclusions:
    """`--quant-exclude` patterns, matched against a weight's name, the HF modules it came from
    and their parents, so that `lm_head` or `model.layers.3.mlp` work as written (a tied
    `lm_head` is the embedding table; both stay in full precision)."""

    patterns: tuple[str, ...]
    matched: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)
    kept: int = 0

    def __call__(self, names: list[str]) -> bool:
        cands = [c for n in names for c in _candidates(n)]
        self.seen.update(cands)
        hits = {p for c in cands for p in self.patterns if fnmatch.fnmatch(c, p)}
        self.matched |= hits
        self.kept += bool(hits)
        return bool(hits)

    def check(self) -> None:
        unmatched = [p for p in self.patterns if p not in self.matched]
        if unmatched:
            near = difflib.get_close_matches(unmatched[0], sorted(self.seen), n=3) or \
                sorted(self.seen, key=lambda n: (-n.count("."), n))[:1]
            raise BuildError(f"--quant-exclude {unmatched[0]!r} matches no quantized weight; "
                             "patterns are fnmatch globs over weight and module names such as "
                             + ", ".join(repr(n) for n in near))


def _candidates(name: str) -> list[str]:
    """`name` plus, for an origin `node@module` or a parameter `module.weight`, the module and
    each of its parents."""
    module = name.partition("@")[2] if "@" in name else name.removesuffix(".weight")
    parts = module.split(".")
    return [name, *(".".join(parts[:i]) for i in range(len(parts), 0, -1))]


# ---- graph surgery -----------------------------------------------------------------------


class _Weights:
    """The graph's weight values during the pass, and their writes back to the graph."""

    def __init__(self, graph: Graph, env: QuantEnv, values: dict[str, torch.Tensor]) -> None:
        self.graph, self.env, self.values = graph, env, values

    def set(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.graph.weights[name]
        key = f"quant:{name}"
        tensor = tensor.to(self.values[name].dtype).contiguous()
        self.env.buffers[key] = tensor
        self.values[name] = tensor
        spec.recipe = {"buffer": key}

    def add(self, name: str, tensor: torch.Tensor, origin: list[str]) -> Node:
        from llm_engine.kernels.dtypes import dtype_name

        key = f"quant:{name}"
        tensor = tensor.contiguous()
        self.env.buffers[key] = tensor
        self.values[name] = tensor
        return self.graph.add_weight(WeightSpec(name, tuple(tensor.shape), dtype_name(tensor.dtype),
                                                {"buffer": key}), origin=origin)


def _fold_attention_v(graph: Graph, w: _Weights, act: Node) \
        -> tuple[Callable[[torch.Tensor], None], Callable[[torch.Tensor], torch.Tensor]] | None:
    """Dividing the V rows of KV head j by s divides every query head that reads KV head j by
    the same s, so an o_proj scale is exact when it is equal across the query heads of one KV
    group (GQA) — `tie` makes it so. Returns (fold, tie), or None when `act` is not
    attention's output."""
    found = attention_v_rows(graph, act)
    if found is None:
        return None
    kv_heads, d, start, end = found.kv_heads, found.head_dim, found.start, found.end
    rep = found.heads // kv_heads

    def tie(t: torch.Tensor) -> torch.Tensor:
        per_kv = t.reshape(kv_heads, rep, d).mean(dim=1, keepdim=True)
        return per_kv.expand(kv_heads, rep, d).reshape(-1).to(t.dtype)

    def fold_v(s: torch.Tensor) -> None:
        s_kv = s.reshape(kv_heads, rep, d)[:, 0].reshape(-1)  # tied: any head of the group
        for name in found.names:  # the weight [N, K] and the bias [N]: scale V's rows
            t = w.values[name].float().clone()
            t[start:end] = t[start:end] / (s_kv[:, None] if t.dim() == 2 else s_kv)
            w.set(name, t)

    return fold_v, tie


def _fold_target(graph: Graph, w: _Weights, act: str, readers: list[str]) \
        -> tuple[Callable[[torch.Tensor], None] | None, Callable | None]:
    """A function that divides the activation `act` by s (per channel) at its producer, and
    the tie its s must satisfy (or None); (None, None) when that cannot be done exactly."""
    if sorted(u.name for u in graph.users(act)) != sorted(readers):
        return None, None
    p = graph.node(act)
    if p.op in LAYOUT_OPS:
        found = _fold_attention_v(graph, w, p)
        if found is not None:
            return found
        p = through_reshapes(graph, p)
    norm, w_i, b_i = None, 0, None
    if p.op == "getitem" and p.attrs.get("index") == 0:
        base = graph.node(p.inputs[0])
        if base.op in ("add_rms_norm", "add_layer_norm"):
            norm, w_i, b_i = base, 2, 3 if base.op == "add_layer_norm" else None
    elif p.op in ("rms_norm", "layer_norm"):
        norm, w_i, b_i = p, 1, 2 if p.op == "layer_norm" else None
    if norm is not None:
        targets = [norm.inputs[i] for i in (w_i, b_i) if i is not None and i < len(norm.inputs)]
        if not all(graph.node(t).op == "weight" and only_user(graph, t, norm.name)
                   for t in targets):
            return None, None
        names = [graph.node(t).attrs["name"] for t in targets]

        def fold_norm(s: torch.Tensor) -> None:
            for name in names:
                w.set(name, w.values[name].float() / s)

        return fold_norm, None
    if p.op == "gated_act":
        up = graph.node(p.inputs[0])
        names = dense_weight_names(graph, up) if only_user(graph, up.name, p.name) else None
        if names is None:
            return None, None

        def fold_up(s: torch.Tensor) -> None:
            for name in names:  # the weight [2I, K] and the bias [2I]: scale the up half
                t = w.values[name].float().clone()
                half = t.shape[0] // 2
                t[half:] = t[half:] / (s[:, None] if t.dim() == 2 else s)
                w.set(name, t)

        return fold_up, None
    return None, None


def _table_users(graph: Graph) -> dict[str, list[Node]]:
    """Weight nodes read by an embedding (and any linear sharing it, a tied LM head) or by
    an LM head: weight node name -> its users."""
    tables: dict[str, list[Node]] = {}
    for node in graph.nodes():
        if node.op == "embedding" and node.attrs.get("b_format", "dense") == "dense":
            tables[node.inputs[0]] = graph.users(node.inputs[0])
        elif node.op == "linear" and any("lm_head" in o for o in node.origin):
            tables.setdefault(node.inputs[1], graph.users(node.inputs[1]))
    return tables


def _groups(graph: Graph, w: _Weights, excluded: _Exclusions, tables: dict,
            fold_v: bool) -> list[_Group]:
    groups = []
    for act, readers in cal.linear_inputs(graph).items():
        mine = []
        for name in readers:
            node = graph.node(name)
            wnode = graph.producer(node, 1)
            if wnode.name in tables or is_rotation_linear(graph, node):
                continue
            if excluded([wnode.attrs["name"], *wnode.origin, *node.origin]):
                continue
            mine.append(name)
        if mine:
            fold, tie = _fold_target(graph, w, act, readers) if mine == readers else (None, None)
            if tie is not None and not fold_v:
                fold = tie = None
            groups.append(_Group(act, mine, fold, tie))
    return groups


# ---- per-group quantization --------------------------------------------------------------


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


def _integer_zeros(options: Any) -> bool:
    return getattr(options, "int4_zero_point", "float") == "integer"


def format_for(mode: str, options: Any) -> str:
    """The `linear` b_format a mode's GEMMs get."""
    if mode == "fp8":
        return {"per-token": "fp8_channel_a8_token", "per-token-group": "fp8_channel_a8_group",
                }.get(getattr(options, "fp8_act_scales", "static"), FORMAT[mode])
    return FORMAT[mode]


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


def _dequantized(mode: str, ops_: list[torch.Tensor], group: int) -> torch.Tensor:
    if mode in ("int8-wo", "int8-sq"):
        return Q.dequantize_int8_channel(*ops_)
    if mode == "fp8":
        return Q.dequantize_fp8_channel(*ops_[:2])
    return Q.dequantize_int4_group(*ops_, group)


def _quantize_group(g: _Group, mode: str, w: _Weights, calib: cal.Calibration, options) \
        -> dict[str, dict[str, Any]]:
    graph = w.graph
    nodes = [graph.node(n) for n in g.linears]
    wnodes = [graph.producer(n, 1) for n in nodes]
    names = [wn.attrs["name"] for wn in wnodes]
    W0 = torch.cat([w.values[n].float() for n in names])
    K = W0.shape[1]
    stats = calib.acts[g.act]
    x = stats.sample.float()
    fmt = format_for(mode, options)
    integer_zeros = _integer_zeros(options)
    group = 0
    if mode.startswith("int4"):
        group = group_size_for(K, options.group_size or DEFAULT_GROUP)
    elif fmt == "fp8_channel_a8_group":
        group = fp8_group_for(K, options.group_size or DEFAULT_GROUP) or 0
    s = None
    extra: dict[str, Any] = {}
    W = W0
    if mode == "int8-sq" and g.fold is not None:
        alpha = options.smoothquant_alpha
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
        parts = [w.add(f"{name}.{p}", t, wnode.origin)
                 for p, t in zip(_PART_NAMES[fmt], operands, strict=True)]
        bias = node.inputs[2:]
        graph.set_inputs(node, [node.inputs[0], *(p.name for p in parts), *bias])
        node.attrs["b_format"] = fmt
        if group:
            node.attrs["group_size"] = group
        deq = _dequantized(mode, operands, group)
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


_PART_NAMES = {"int8_channel": ("int8", "scale"), "int8_channel_a8": ("int8", "scale"),
               "fp8_channel_a8": ("fp8", "scale", "x_scale"),
               "fp8_channel_a8_token": ("fp8", "scale"),
               "fp8_channel_a8_group": ("fp8", "scale"),
               "int4_group": ("int4", "scales", "zeros")}


def _kept_tables(graph: Graph, tables: dict[str, list[Node]],
                 excluded: _Exclusions) -> dict[str, list[Node]]:
    """The tables to quantize: those read only by embeddings and linears, and not excluded."""
    keep = {}
    for wnode_name, users in tables.items():
        wnode = graph.node(wnode_name)
        origins = [*wnode.origin, *(o for u in users for o in u.origin)]
        if not excluded([wnode.attrs["name"], *origins]) and \
                all(u.op in ("embedding", "linear") for u in users):
            keep[wnode_name] = users
    return keep


def _quantize_tables(graph: Graph, w: _Weights, tables: dict[str, list[Node]],
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
                        F.linear(x, W), Q.int8_linear(x, q, scale)), 6)
                    entry["act_absmax"] = round(x_stats.absmax.max().item(), 4)
        deq = Q.dequantize_int8_channel(q, scale)
        entry["weight_rel_error"] = round(((deq - W).norm() / W.norm().clamp_min(1e-30)).item(), 6)
        entry["weight_scale"] = {"min": scale.min().item(), "max": scale.max().item()}
        report[name] = entry
    return report


def _kv_scales(calib: cal.Calibration, kv: str) -> dict[int, tuple[list[float], list[float]]]:
    qmax = KV_QMAX[kv]
    return {layer: ((k.clamp_min(1e-6) / qmax).tolist(), (v.clamp_min(1e-6) / qmax).tolist())
            for layer, (k, v) in sorted(calib.kv.items())}


# ---- the pass ----------------------------------------------------------------------------


def _calibration(graph: Graph, values: dict[str, torch.Tensor], samples: list[list[int]],
                 hessian: bool, env: QuantEnv, options) -> cal.Calibration:
    cache_dir = options.calib_cache
    path = None
    if cache_dir is not None:
        key = cal.cache_key(graph, cal.weight_digest(values, graph.weights), samples, hessian)
        path = Path(cache_dir) / f"{key}.safetensors"
        found = cal.load(path) if path.is_file() else None
        if found is not None:
            return found
    tick = env.ui.counter("calibration", len(samples)) if env.ui else None
    calib = cal.calibrate(graph, values, samples, hessian=hessian, progress=tick)
    if path is not None:
        try:
            cal.save(calib, path)
        except OSError as e:  # a read-only home is no reason to fail the build
            env.notes.append(f"calibration cache not written ({e})")
    return calib


# What --rotation auto picks per mode: held-out perplexity increase on SmolLM2 (16k tokens,
# README) with none / offline / online. Rotation spreads activation outliers, which per-token
# int8 activations need; weight-only modes lose by it (their error then falls on every input
# channel alike instead of the quiet ones: int8-wo +0.07 -> +0.19, int4-awq +13.0 -> +23.0,
# int4-gptq +7.9 -> +7.7 with a worse build check), and e4m3's error is relative per value,
# which rotation does not shrink (fp8 +2.83 / +2.74 / +3.57; with per-token activation scales
# +1.90 / +2.84 / -: spreading an outlier over all channels loses its exactness as the row max).
AUTO_ROTATION = {"int8-wo": "none", "int8-sq": "online", "fp8": "none", "int4-awq": "none",
                 "int4-gptq": "none"}  # int8-sq: +0.98 / +0.47 / +0.17


def rotation_for(options) -> str:
    """The rotation this build applies. The online rotation adds GEMMs inside the MLP that
    tensor parallelism would have to split by its blocks; with --tp it falls back to offline."""
    kind = getattr(options, "rotation", "none")
    if kind == "auto":
        kind = AUTO_ROTATION.get(options.quant, "none")
    if kind == "online" and getattr(options, "tp", 1) > 1:
        kind = "offline"
    return kind


def check_options(options) -> None:
    """The --quant family of options, checked before any work."""
    mode, kv = options.quant, options.kv_cache_dtype
    if mode is not None and mode not in MODES:
        raise BuildError(f"--quant {mode!r} is not one of {', '.join(MODES)}")
    if kv is not None and kv not in KV_DTYPES:
        raise BuildError(f"--kv-cache-dtype {kv!r} is not one of {', '.join(KV_DTYPES)}")
    if (mode == "fp8" or kv == "fp8") and not has_fp8():
        raise BuildError(f"fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} "
                         "lacks; upgrade torch or use --quant int8-wo / --kv-cache-dtype int8")
    if options.group_size is not None and (not isinstance(options.group_size, int)
                                           or options.group_size < 8):
        raise BuildError(f"--group-size {options.group_size} is too small; use a group of "
                         "at least 8 input channels, 32 for fp8 groups (128 is the usual "
                         "choice)")
    alpha = options.smoothquant_alpha
    if alpha != "auto" and not (isinstance(alpha, int | float) and 0.0 <= alpha <= 1.0):
        raise BuildError(f"--smoothquant-alpha {alpha} is outside [0, 1]; pass a number in "
                         "[0, 1] or 'auto' (searched per layer)")
    rotation = getattr(options, "rotation", "none")
    if rotation not in (*ROTATIONS, "auto"):
        raise BuildError(f"--rotation {rotation!r} is not one of {', '.join(ROTATIONS)}, auto")
    if mode is None and rotation not in ("none", "auto"):
        raise BuildError(f"--rotation {rotation} needs --quant: it prepares weights and "
                         "activations for quantization")
    act_scales = getattr(options, "fp8_act_scales", "static")
    if act_scales not in FP8_ACT_SCALES:
        raise BuildError(f"--fp8-act-scales {act_scales!r} is not one of "
                         f"{', '.join(FP8_ACT_SCALES)}")
    zero_point = getattr(options, "int4_zero_point", "float")
    if zero_point not in INT4_ZERO_POINTS:
        raise BuildError(f"--int4-zero-point {zero_point!r} is not one of "
                         f"{', '.join(INT4_ZERO_POINTS)}")
    if zero_point != "float" and not (mode or "").startswith("int4"):
        raise BuildError(f"--int4-zero-point {zero_point} needs --quant int4-awq or int4-gptq")
    if options.quant_exclude and mode is None:
        raise BuildError("--quant-exclude needs --quant: without it no weight is quantized")
    if act_scales != "static" and mode != "fp8":
        raise BuildError(f"--fp8-act-scales {act_scales} needs --quant fp8 (int8-sq's "
                         "activations are always per token)")
    if options.group_size is not None and not (mode and format_for(mode, options) in GROUPED):
        what = f"--quant {mode}" + (f" --fp8-act-scales {act_scales}" if mode == "fp8" else "") \
            if mode else "a build without --quant"
        raise BuildError(f"--group-size sets int4 weight groups and fp8 per-token-group "
                         f"activation groups; {what} has none")
    g = options.group_size
    if act_scales == "per-token-group" and g is not None and (g < 32 or g & (g - 1)):
        raise BuildError(f"--group-size {g}: fp8 activation groups are powers of two >= 32 "
                         "(the GPU kernel's K tile); use 32, 64 or 128")
    if options.calib_samples < 1 or options.calib_seq_len < 16:
        raise BuildError("--calib-samples must be >= 1 and --calib-seq-len >= 16")
    if options.calib_data is not None and not Path(options.calib_data).is_file():
        raise BuildError(f"--calib-data {options.calib_data}: no such file")
    gates = (options.max_ppl_increase, options.min_greedy_agreement)
    if mode is None and kv is None and any(v is not None for v in gates):
        raise BuildError("--max-ppl-increase / --min-greedy-agreement need --quant or "
                         "--kv-cache-dtype: there is nothing to measure")
    if options.min_greedy_agreement is not None and not 0 <= options.min_greedy_agreement <= 1:
        raise BuildError("--min-greedy-agreement is a fraction in [0, 1], e.g. 0.9")


def _check_groups(graph: Graph, groups: list[_Group], group_size: int | None) -> None:
    """A --group-size given must divide at least one layer's input width (a typo such as 100
    would otherwise quietly become another size everywhere); the others fall back. The
    default (128) falls back silently."""
    widths = sorted({graph.producer(graph.node(g.linears[0]), 1).shape[1] for g in groups})
    if group_size is not None and widths and all(K % group_size for K in widths):
        common = [d for d in (256, 128, 64, 32, 16, 8) if all(K % d == 0 for K in widths)]
        raise BuildError(f"--group-size {group_size} divides none of the layers' input widths "
                         f"({', '.join(map(str, widths))}); use a divisor"
                         + (f" such as {common[0]}" if common else ""))
    for K in widths:
        try:
            group_size_for(K, group_size or DEFAULT_GROUP)
        except ValueError as e:
            raise BuildError(f"--group-size {group_size}: {e}") from e


def _check_fp8_groups(graph: Graph, groups: list[_Group], group_size: int | None) -> None:
    """Every GEMM of fp8 per-token-group needs a power-of-two group >= 32 dividing its K."""
    for g in groups:
        wnode = graph.producer(graph.node(g.linears[0]), 1)
        K = wnode.shape[1]
        if fp8_group_for(K, group_size or DEFAULT_GROUP) is None:
            raise BuildError(f"--fp8-act-scales per-token-group: {wnode.attrs['name']} has {K} "
                             "input channels, which no power-of-two group of 32 to "
                             f"{group_size or DEFAULT_GROUP} divides; use --fp8-act-scales "
                             "per-token, or keep that layer out with --quant-exclude")


def quantize(graph: Graph, options: Any, env: QuantEnv | None = None) -> tuple[Graph, PassReport]:
    report = PassReport("quantize")
    mode, kv = getattr(options, "quant", None), getattr(options, "kv_cache_dtype", None)
    if mode is None and kv is None:
        report.notes.append("no --quant: weights keep the build dtype")
        return graph, report
    check_options(options)
    if env is None:
        raise BuildError("the quantize pass needs the checkpoint; run it from build_engine")
    start = time.perf_counter()
    excluded = _Exclusions(tuple(options.quant_exclude or ()))
    values = {name: make_weight(spec, env.source, env.buffers)
              for name, spec in graph.weights.items()}
    w = _Weights(graph, env, values)
    fmt = format_for(mode, options) if mode else None
    rotation = rotate(graph, w, rotation_for(options)) if mode else None
    tables = _table_users(graph) if mode else {}
    # A quantized KV cache keeps V's calibrated scales, so V's rows stay as they are.
    groups = _groups(graph, w, excluded, tables, fold_v=kv is None) if mode else []
    tables = _kept_tables(graph, tables, excluded)
    excluded.check()
    if fmt == "int4_group":
        _check_groups(graph, groups, options.group_size)
    if fmt == "fp8_channel_a8_group":
        _check_fp8_groups(graph, groups, options.group_size)
    tokenizer = env.tokenizer() if env.tokenizer else None
    seq_len = min(options.calib_seq_len, env.max_seq_len)
    data = load_calib_data(options.calib_data, tokenizer, samples=options.calib_samples,
                           seq_len=seq_len, heldout=HELDOUT_WINDOWS, vocab_size=env.vocab_size)
    t_cal = time.perf_counter()
    calib = _calibration(graph, values, data.samples, mode is not None, env, options)
    t_cal = time.perf_counter() - t_cal
    ref_graph, ref_values = copy.deepcopy(graph), dict(values)

    layers: dict[str, dict] = {}
    if mode:
        tick = env.ui.counter("quantize", len(groups)) if env.ui else None
        for g in reversed(groups):  # down before gate/up: down's 1/s is folded into up's rows
            layers.update(_quantize_group(g, mode, w, calib, options))
            if tick:
                tick(g.linears[0])
        layers.update(_quantize_tables(graph, w, tables, calib))
    kv_info = None
    if kv:
        from llm_engine.builder.passes.kv_quant import quantize_kv_cache

        scales = _kv_scales(calib, kv)
        quantize_kv_cache(graph, KV_DTYPES[kv], scales)
        kv_info = {"dtype": KV_DTYPES[kv], "scales": {str(k): {"k": [round(x, 6) for x in ks],
                                                              "v": [round(x, 6) for x in vs]}
                                                      for k, (ks, vs) in scales.items()}}
    graph.dce()
    for name in list(values):
        if name not in graph.weights:
            del values[name]

    with_ui = env.ui.stage("measure quality (held-out)") if env.ui else _null()
    with with_ui:
        quality = compare(cal.GraphRunner(ref_graph, ref_values), cal.GraphRunner(graph, values),
                          data.heldout)
    worst = sorted(((n, e["output_rel_error"]) for n, e in layers.items()
                    if "output_rel_error" in e), key=lambda kv_: -kv_[1])[:5]
    gates = _gates(options, quality)
    qreport = {
        "mode": mode,
        "kv_cache_dtype": KV_DTYPES.get(kv) if kv else None,
        "group_size": (options.group_size or DEFAULT_GROUP) if fmt in GROUPED else None,
        "fp8_act_scales": getattr(options, "fp8_act_scales", "static") if mode == "fp8" else None,
        "int4_zero_point": getattr(options, "int4_zero_point", "float") if fmt == "int4_group"
        else None,
        "calibration": {"source": data.source, "samples": len(data.samples),
                        "seq_len": data.seq_len, "tokens": calib.tokens, "cached": calib.cached,
                        "seconds": round(t_cal, 2), "notes": data.notes + env.notes},
        "quality": {**quality.to_json(), "heldout": "the last "
                    f"{HELDOUT_WINDOWS} windows of the calibration source"},
        "gates": gates,
        "layers": layers,
        "weight_rel_error": {n: e["weight_rel_error"] for n, e in sorted(layers.items())},
        "worst": worst,
        "kv_cache": kv_info,
        "rotation": rotation,
        "excluded": excluded.kept,
        "cpu_paths": Q.cpu_paths(),
        "seconds": round(time.perf_counter() - start, 2),
    }
    graph.meta["quantization"] = qreport
    report.changed = True
    report.stats.update({"mode": mode, "kv": kv, "quantized_linears": len(layers),
                         "excluded": excluded.kept,
                         "ppl_increase_pct": round(quality.ppl_increase_pct, 3),
                         "greedy_agreement": round(quality.greedy_agreement, 4)})
    if gates["failed"]:
        _fail_gate(options, qreport, gates["failed"], worst)
    return graph, report


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _gates(options, quality) -> dict[str, Any]:
    failed = []
    if options.max_ppl_increase is not None and \
            quality.ppl_increase_pct > options.max_ppl_increase:
        failed.append(f"perplexity +{quality.ppl_increase_pct:.2f}% > --max-ppl-increase "
                      f"{options.max_ppl_increase}%")
    if options.min_greedy_agreement is not None and \
            quality.greedy_agreement < options.min_greedy_agreement:
        failed.append(f"greedy agreement {quality.greedy_agreement:.3f} < "
                      f"--min-greedy-agreement {options.min_greedy_agreement}")
    return {"max_ppl_increase": options.max_ppl_increase,
            "min_greedy_agreement": options.min_greedy_agreement, "failed": failed}


def gate_report_path(output: Path) -> Path:
    return Path(output).with_name(Path(output).name + ".quant-report.json")


def _fail_gate(options, qreport: dict, failed: list[str], worst) -> None:
    path = gate_report_path(options.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(qreport, indent=1))
    layers = ", ".join(f"{n} ({e:.3f})" for n, e in worst[:3])
    raise BuildError(f"quantized engine fails the accuracy gate: {'; '.join(failed)} on "
                     f"{qreport['quality']['tokens']} held-out tokens; largest output error: "
                     f"{layers or 'n/a'}; no engine written, report: {path}")
