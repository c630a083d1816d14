#!/usr/bin/env python
"""Every quantization mode of SmolLM2-135M-Instruct side by side: engine size, peak memory,
batch-1 and 64-concurrent decode throughput, and perplexity against the fp32 engine on text
the builds did not calibrate on.

Each engine is built once (engines/smollm2-<mode>; `--rebuild` to redo) and measured in a
fresh subprocess, so its peak RSS is its own: load, one request (batch-1 tokens/s), then
`--concurrency` requests at once (aggregate tokens/s), then perplexity over `--eval-tokens`
tokens of the built-in text starting `--eval-skip` tokens in (past the calibration windows,
which are its first 8 x 512 tokens; runtime.evaluate, window 512) on the reference executor
(the quantized arithmetic as defined) and, with KL / greedy agreement against the fp32
engine, on the default CPU backend (onnxruntime, whose `MatMulNBits` also rounds activations).
The build's own held-out numbers (report.json) are listed too. Writes <out>/quant.json and
prints a markdown table headed by the command.

    python benchmarks/quant.py [--modes fp32 int8-wo int8-sq fp8 int4-awq int4-gptq]
        [--concurrency 64] [--output-tokens 64] [--eval-tokens 16384] [--eval-skip 32768]
        [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The sibling scripts, never the repository root: there builder/, runtime/, kernels/ would
# shadow installed packages of those names (HF's `kernels`).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import build_prompts, engine_pass, log  # noqa: E402

EVAL_WINDOW = 512
MODES = ["fp32", "int8-wo", "int8-sq", "fp8", "int4-awq", "int4-gptq"]
BUILD_EXTRA = {"int8-sq+kv8": {"quant": "int8-sq", "kv_cache_dtype": "int8"},
               # int8-sq's default rotates the model (--rotation auto = online); these show
               # what each rotation buys and costs.
               "int8-sq-rotation-none": {"quant": "int8-sq", "rotation": "none"},
               "int8-sq-rotation-offline": {"quant": "int8-sq", "rotation": "offline"},
               # fp8 with each token's own activation scale instead of one static scale
               "fp8-per-token": {"quant": "fp8", "fp8_act_scales": "per-token"},
               # ... or one per token and group of 128 input channels (64 where 128 does not
               # divide), DeepSeek-V3's activation tiles
               "fp8-group": {"quant": "fp8", "fp8_act_scales": "per-token-group"}}


def engine_dir(root: Path, mode: str) -> Path:
    return root / ("smollm2" if mode == "fp32" else f"smollm2-{mode}")


def build(mode: str, path: Path, rebuild: bool) -> float | None:
    if (path / "engine.json").is_file() and not rebuild:
        return None
    from llm_engine.builder.build import BuildOptions, build_engine

    opts = BUILD_EXTRA.get(mode, {"quant": None if mode == "fp32" else mode})
    log(f"building {path} ({mode})...")
    t0 = time.perf_counter()
    build_engine(BuildOptions(model="smollm2", output=path, force=True, **opts))
    return round(time.perf_counter() - t0, 1)


def measure(path: Path, ref: Path, args) -> dict:
    """Runs in the child process: everything about one engine."""
    import torch

    from llm_engine.runtime.engine import Engine
    from llm_engine.runtime.evaluate import builtin_text, evaluate

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine = Engine.load(path, max_num_seqs=args.concurrency)
    load_s = time.perf_counter() - t0
    prompts, _ = build_prompts(engine.tokenizer, args.concurrency + 1, 32)
    engine_pass(engine, prompts[:1], 4)  # warm-up
    result = {"load_s": round(load_s, 2)}
    for label, batch in (("batch1", prompts[:1]), ("concurrent", prompts[1:])):
        t0 = time.monotonic()
        outs = engine_pass(engine, batch, args.output_tokens)
        wall = time.monotonic() - t0
        result[f"{label}_tok_s"] = round(sum(len(o.token_ids) for o in outs) / wall, 2)
    # Before the evaluation, which loads the fp32 reference engine into this process too.
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    ids = engine.tokenizer.encode(builtin_text(), add_special_tokens=False)
    ids = ids[args.eval_skip:args.eval_skip + args.eval_tokens]
    reference = None if path == ref else Engine.load(ref, max_num_seqs=1)
    ev = evaluate(engine, ids, EVAL_WINDOW, reference=reference)
    result.update({"ppl": round(ev.perplexity, 4), "eval_tokens": ev.tokens,
                   "backend": engine.kernel_backend})
    del engine
    exact = Engine.load(path, max_num_seqs=1, kernels="reference")
    result["ppl_reference"] = round(evaluate(exact, ids, EVAL_WINDOW).perplexity, 4)
    if reference is not None:
        result.update({"kl": round(ev.kl, 5), "agreement": round(ev.agreement, 4)})
        del reference
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=MODES,
                   choices=MODES + sorted(BUILD_EXTRA))
    p.add_argument("--engines", type=Path, default=REPO / "engines")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-skip", type=int, default=32768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--build-only", action="store_true", help="build missing engines, measure none")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "REF"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), Path(args.child[1]), args)))
        return 0

    ref = engine_dir(args.engines, "fp32")
    build("fp32", ref, False)
    rows = {}
    for mode in args.modes:
        path = engine_dir(args.engines, mode)
        build_s = build(mode, path, args.rebuild)
        if args.build_only:
            continue
        report = json.loads((path / "report.json").read_text())
        log(f"measuring {mode}...")
        child = [sys.executable, __file__, "--child", str(path), str(ref),
                 "--concurrency", str(args.concurrency), "--output-tokens",
                 str(args.output_tokens), "--eval-tokens", str(args.eval_tokens),
                 "--eval-skip", str(args.eval_skip),
                 "--threads", str(args.threads)]
        out = subprocess.run(child, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"measuring {mode} failed:\n{out.stderr[-2000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        q = report.get("quantization") or {}
        row.update({"engine_mb": round(report["weights"]["bytes"] / 1e6, 1),
                    "build_heldout_ppl_increase_pct": (q.get("quality") or {}).get(
                        "ppl_increase_pct"),
                    "build_s": build_s or round(sum(report["timings_s"].values()), 1)})
        rows[mode] = row
        log(f"{mode}: {row}")
    if args.build_only:
        return 0
    base = rows.get("fp32")
    for row in rows.values():
        if base:
            row["size_vs_fp32"] = round(row["engine_mb"] / base["engine_mb"], 3)
            row["ppl_increase_pct"] = round(100 * (row["ppl"] / base["ppl"] - 1), 2)
            row["ppl_reference_increase_pct"] = round(
                100 * (row["ppl_reference"] / base["ppl_reference"] - 1), 2)
    command = "python benchmarks/quant.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant.json").write_text(json.dumps({"command": command, "rows": rows},
                                                    indent=1))
    print(f"`{command.strip()}`\n")
    print("| mode | engine MB | × fp32 | peak RSS MB | batch-1 tok/s | "
          f"{args.concurrency}-concurrent tok/s | Δppl reference | Δppl fast path | KL | "
          "greedy agree | build Δppl (held-out) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        build_pct = r["build_heldout_ppl_increase_pct"]
        print(f"| {mode} | {r['engine_mb']} | {r.get('size_vs_fp32', '')} | {r['peak_rss_mb']} | "
              f"{r['batch1_tok_s']} | {r['concurrent_tok_s']} | "
              f"{r.get('ppl_reference_increase_pct', '')}% | "
              f"{r.get('ppl_increase_pct', '')}% | {r.get('kl', '–')} | "
              f"{r.get('agreement', '–')} | "
              f"{'–' if build_pct is None else f'{build_pct:.2f}%'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
