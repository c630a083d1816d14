"""Quantize GEMM weights and the KV cache (`engine build --quant MODE --kv-cache-dtype D`).

Modes (the `linear` weight formats they produce are `kernels.formats` entries):

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

Everything is computed from the calibration run (`builder.quant.calibrate`); the values go to
the writer as buffers. Afterwards the quantized graph is scored against the unquantized one on
held-out windows, which fills the report and the optional build gates. This file is the pass;
its parts are in `builder/quant/`: `config` (the checked options and the policies that follow
from them), `folds` (groups of linears, exact folds, tables, exclusions), `linear` (one group
in the mode's format), `tables`, `gates`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph
from llm_engine.builder.passes.report import PassReport
from llm_engine.builder.quant import calibrate as cal
from llm_engine.builder.quant.calib_data import load_calib_data
from llm_engine.builder.quant.config import (
    DEFAULT_GROUP,
    HELDOUT_WINDOWS,
    KV_DTYPES,
    KV_QMAX,
    QuantConfig,
    fp8_group_for,
    group_size_for,
)
from llm_engine.builder.quant.experts import quantize_experts
from llm_engine.builder.quant.folds import Exclusions, Group, Weights, groups, table_users
from llm_engine.builder.quant.gates import fail_gate, gates
from llm_engine.builder.quant.linear import quantize_group
from llm_engine.builder.quant.quality import compare
from llm_engine.builder.quant.rotate import rotate
from llm_engine.builder.quant.tables import kept_tables, quantize_tables
from llm_engine.builder.weights import make_weight
from llm_engine.kernels import cpu_kernels, formats


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


def _kv_scales(calib: cal.Calibration, kv: str) -> dict[int, tuple[list[float], list[float]]]:
    qmax = KV_QMAX[kv]
    return {layer: ((k.clamp_min(1e-6) / qmax).tolist(), (v.clamp_min(1e-6) / qmax).tolist())
            for layer, (k, v) in sorted(calib.kv.items())}


def _calibration(graph: Graph, values: dict[str, torch.Tensor], samples: list[list[int]],
                 hessian: bool, env: QuantEnv, config: QuantConfig) -> cal.Calibration:
    """The calibration run, or its cached result (keyed by graph, weights and samples)."""
    cache_dir = config.calib_cache
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


def _check_groups(graph: Graph, groups: list[Group], group_size: int | None) -> None:
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


def _check_fp8_groups(graph: Graph, groups: list[Group], group_size: int | None) -> None:
    """Every GEMM of fp8 per-token-group needs a power-of-two group >= 32 dividing its K."""
    for g in groups:
        wnode = graph.producer(graph.node(g.linears[0]), 1)
        K = wnode.shape[1]
        if fp8_group_for(K, group_size or DEFAULT_GROUP) is None:
            raise BuildError(f"--fp8-act-scales per-token-group: {wnode.attrs['name']} has {K} "
                             "input channels, which no power-of-two group of 32 to "
                             f"{group_size or DEFAULT_GROUP} divides; use --fp8-act-scales "
                             "per-token, or keep that layer out with --quant-exclude")


def quantize(graph: Graph, options: Any) -> tuple[Graph, PassReport]:
    """The pass: `options.quant_config` says what to do (builder.build.BuildOptions checks it
    once); the checkpoint, tokenizer and progress display come with the options too
    (builder.build.PassOptions)."""
    report = PassReport("quantize")
    config: QuantConfig = options.quant_config
    mode, kv = config.mode, config.kv_cache_dtype
    if not config.enabled:
        report.notes.append("no --quant: weights keep the build dtype")
        return graph, report
    if options.weights is None:
        raise BuildError("the quantize pass needs the checkpoint; run it from build_engine")
    env = QuantEnv(options.weights, options.buffers, options.tokenizer, options.vocab_size,
                   options.max_seq_len, options.ui)
    start = time.perf_counter()
    excluded = Exclusions(config.exclude)
    values = {name: make_weight(spec, env.source, env.buffers)
              for name, spec in graph.weights.items()}
    w = Weights(graph, env, values)
    fmt = config.weight_format
    rotation = rotate(graph, w, config.applied_rotation) if mode else None
    tables = table_users(graph) if mode else {}
    # A quantized KV cache keeps V's calibrated scales, so V's rows stay as they are.
    linears = groups(graph, w, excluded, tables, fold_v=kv is None) if mode else []
    tables = kept_tables(graph, tables, excluded)
    excluded.check()
    if fmt == "int4_group":
        _check_groups(graph, linears, config.group_size)
    if fmt == "fp8_channel_a8_group":
        _check_fp8_groups(graph, linears, config.group_size)
    tokenizer = env.tokenizer() if env.tokenizer else None
    seq_len = min(config.calib_seq_len, env.max_seq_len)
    data = load_calib_data(config.calib_data, tokenizer, samples=config.calib_samples,
                           seq_len=seq_len, heldout=HELDOUT_WINDOWS, vocab_size=env.vocab_size)
    t_cal = time.perf_counter()
    calib = _calibration(graph, values, data.samples, mode is not None, env, config)
    t_cal = time.perf_counter() - t_cal
    ref_graph, ref_values = copy.deepcopy(graph), dict(values)

    layers: dict[str, dict] = {}
    experts: dict[str, dict] = {}
    if mode:
        tick = env.ui.counter("quantize", len(linears)) if env.ui else None
        for g in reversed(linears):  # down before gate/up: down's 1/s is folded into up's rows
            layers.update(quantize_group(g, w, calib, config))
            if tick:
                tick(g.linears[0])
        layers.update(quantize_tables(graph, w, tables, calib))
        experts = quantize_experts(w, calib, config)
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
    gate = gates(config, quality)
    qreport = {
        "mode": mode,
        "kv_cache_dtype": KV_DTYPES.get(kv) if kv else None,
        "group_size": config.group if fmt in formats.GROUPED else None,
        "fp8_act_scales": config.fp8_act_scales if mode == "fp8" else None,
        "int4_zero_point": config.int4_zero_point if fmt == "int4_group" else None,
        "calibration": {"source": data.source, "samples": len(data.samples),
                        "seq_len": data.seq_len, "tokens": calib.tokens, "cached": calib.cached,
                        "seconds": round(t_cal, 2), "notes": data.notes + env.notes},
        "quality": {**quality.to_json(), "heldout": "the last "
                    f"{HELDOUT_WINDOWS} windows of the calibration source"},
        "gates": gate,
        "layers": layers,
        "experts": experts,
        "weight_rel_error": {n: e["weight_rel_error"] for n, e in sorted(layers.items())},
        "worst": worst,
        "kv_cache": kv_info,
        "rotation": rotation,
        "excluded": excluded.kept,
        "cpu_paths": cpu_kernels.cpu_paths(),
        "seconds": round(time.perf_counter() - start, 2),
    }
    graph.meta["quantization"] = qreport
    report.changed = True
    report.stats.update({"mode": mode, "kv": kv, "quantized_linears": len(layers),
                         "excluded": excluded.kept, "quantized_moe_layers": len(experts),
                         "ppl_increase_pct": round(quality.ppl_increase_pct, 3),
                         "greedy_agreement": round(quality.greedy_agreement, 4)})
    if gate["failed"]:
        fail_gate(config, qreport, gate["failed"], worst)
    return graph, report


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


