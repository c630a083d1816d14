#!/usr/bin/env python
"""Speculative decoding on SmolLM2-135M-Instruct: decode speed with and without, side by side
in one process, and greedy output checked identical.

Three measurements, each against the same engine without speculation:

* prompt lookup, batch 1, on prompts whose answers quote them (code edits, copy-editing);
* an int4-awq build of the model drafting for its fp32 build, batch 1, on chat prompts;
* batches of 1 to 64 concurrent chat requests, with prompt lookup forced on every step and
  with the adaptive policy (which turns speculation off where it no longer pays): the
  crossover, measured.

Batch-1 rows alternate plain and speculative runs prompt by prompt, and each concurrency level
is the median of three rounds alternating the engines, so drift on a shared machine hits
them alike. Decode tok/s is tokens after the first over the time after the
first token (each Output's metrics). Writes benchmarks/results/speculative.json and .png.

    python -P benchmarks/speculative.py [--engine engines/smollm2]
        [--draft engines/smollm2-int4] [--k 4] [--max-tokens 128] [--quick]

Engines are built on first use (fp32, and int4-awq for the draft).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "ops"))
import common

REPO = common.REPO
DEFAULT_OUT = common.RESULTS / "speculative.json"

CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''
TEXT = ("The library opens at nine in the morning and closes at six in the evening. Visitors "
        "can borrow up to five books at a time, and each book may be kept for three weeks. "
        "Late returns cost ten cents per day. The reading room on the second floor is quiet, "
        "and group study rooms can be booked at the front desk.")
QUOTING = [  # answers that repeat much of their prompt: where prompt lookup pays
    f"Rename the function moving_average to rolling_mean. Return the whole code.\n\n{CODE}",
    f"Add a docstring to this function and return the complete code.\n\n{CODE}",
    f"Rewrite this code so the variable total is called running_sum. Show all of it.\n\n{CODE}",
    f"Repeat the following text exactly, then say how many sentences it has.\n\n{TEXT}",
    f"Copy this paragraph and replace 'library' with 'museum' everywhere.\n\n{TEXT}",
    f"Summarize the rules below, quoting each rule.\n\n{TEXT}",
]
CHAT = [
    "What is the capital of France?",
    "Explain photosynthesis in simple words.",
    "Write a short poem about the sea.",
    "Give me three tips for learning a new language.",
    "What is the difference between a virus and a bacterium?",
    "How do I make a cup of tea?",
    "Why is the sky blue?",
    "Describe a good morning routine.",
]


def ensure_engine(path: Path, **options: Any) -> Path:
    if (path / "engine.json").is_file():
        return path
    from llm_engine.builder.build import BuildOptions, build_engine

    print(f"building {path} ({options or 'fp32'}; once)...", file=sys.stderr)
    build_engine(BuildOptions(model="smollm2", output=path, force=True, **options))
    return path


def chat(engine, text: str) -> str:
    return engine.apply_chat_template([{"role": "user", "content": text}],
                                      add_generation_prompt=True)


def decode_speed(outs) -> dict[str, float]:
    tokens = sum(len(o.token_ids) - 1 for o in outs)
    seconds = sum(o.metrics["finish"] - o.metrics["first_token"] for o in outs)
    return {"tokens": tokens, "seconds": round(seconds, 3),
            "tok_s": round(tokens / seconds, 2) if seconds else 0.0}


def batch1(plain, spec, prompts: list[str], params) -> dict[str, Any]:
    """Each prompt through both engines, alternating; identical tokens required."""
    base, fast, same = [], [], True
    stats0 = spec.speculator.stats.to_json()
    for p in prompts:
        a = plain.generate([p], params)[0]
        b = spec.generate([p], params)[0]
        base.append(a)
        fast.append(b)
        same &= a.token_ids == b.token_ids
    s_plain, s_spec = decode_speed(base), decode_speed(fast)
    stats = spec.speculator.stats
    proposed = stats.proposed - stats0["proposed"]
    accepted = stats.accepted - stats0["accepted"]
    return {"prompts": len(prompts), "plain": s_plain, "speculative": s_spec,
            "speedup": round(s_spec["tok_s"] / s_plain["tok_s"], 3) if s_plain["tok_s"] else None,
            "identical": same, "proposed": proposed, "accepted": accepted,
            "acceptance_rate": round(accepted / proposed, 4) if proposed else None}


def concurrent(engines: dict[str, Any], prompts: list[str], batch: int, params,
               reps: int = 3) -> dict[str, Any]:
    """`batch` requests at once through each engine: output tok/s over the wall time, the
    median of `reps` rounds that alternate the engines (drift hits them alike)."""
    row: dict[str, Any] = {"batch": batch}
    outs: dict[str, list] = {}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(reps):
        for name, eng in engines.items():
            eng.scheduler.config.max_num_seqs = max(batch, 1)
            t0 = time.perf_counter()
            got = eng.generate(prompts[:batch], params)
            wall = time.perf_counter() - t0
            outs[name] = [o.token_ids for o in got]
            rates[name].append(sum(len(o.token_ids) for o in got) / wall)
    for name, values in rates.items():
        row[name] = round(sorted(values)[len(values) // 2], 2)
    row["identical"] = all(v == outs["plain"] for v in outs.values())
    for name in engines:
        if name != "plain":
            row[f"{name}_ratio"] = round(row[name] / row["plain"], 3)
    return row


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["concurrency"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [r["batch"] for r in rows]
    for name, style in (("ngram_forced", "s--"), ("ngram_adaptive", "o-")):
        ax.plot(xs, [r[f"{name}_ratio"] for r in rows], style, label=name.replace("_", " "))
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tok/s vs no speculation")
    ax.set_title("SmolLM2 fp32, prompt lookup: where speculation stops paying")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, default=REPO / "engines" / "smollm2")
    p.add_argument("--draft", type=Path, default=REPO / "engines" / "smollm2-int4")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--quick", action="store_true", help="smoke test: few prompts and tokens")
    p.add_argument("--only", choices=["lookup", "draft", "concurrency"], nargs="+",
                   default=["lookup", "draft", "concurrency"], help="what to measure")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.batches = 16, [1, 4]

    from llm_engine.runtime import Engine, SamplingParams

    target = ensure_engine(args.engine, dtype="float32")
    draft = ensure_engine(args.draft, quant="int4-awq")
    kv = {"kv_cache_memory": 512 << 20}  # four engines in one process
    plain = Engine.load(target, **kv)
    ngram = Engine.load(target, speculative="ngram", num_speculative_tokens=args.k, **kv)
    drafted = Engine.load(target, speculative="draft", draft_engine=str(draft),
                          num_speculative_tokens=args.k, **kv)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    quoting = [chat(plain, t) for t in (QUOTING[:2] if args.quick else QUOTING)]
    chats = [chat(plain, t) for t in (CHAT[:2] if args.quick else CHAT)]
    for eng in (plain, ngram, drafted):  # warm-up: sessions, caches, the cost model's fit
        eng.generate(chats[:1], SamplingParams(temperature=0, max_tokens=8))

    lookup = draft_row = None
    rows: list[dict[str, Any]] = []
    if "lookup" in args.only:
        print("prompt lookup, batch 1...", file=sys.stderr)
        lookup = batch1(plain, ngram, quoting, params)
    if "draft" in args.only:
        print("int4 draft, batch 1...", file=sys.stderr)
        draft_row = batch1(plain, drafted, chats, params)
    if "concurrency" in args.only:
        print("concurrency...", file=sys.stderr)
        forced = Engine.load(target, speculative="ngram", num_speculative_tokens=args.k,
                             speculative_adaptive=False, **kv)
        many = [chat(plain, t) for t in (CHAT * 8 + [q[:200] for q in QUOTING] * 2)][:64]
        conc_params = SamplingParams(temperature=0, max_tokens=min(64, args.max_tokens),
                                     ignore_eos=True)
        for b in args.batches:
            rows.append(concurrent({"plain": plain, "ngram_forced": forced,
                                    "ngram_adaptive": ngram}, many, b, conc_params,
                                   reps=1 if args.quick else 3))

    threads = int(plain.backend_info.get("threads", 0) or 0)
    machine = common.machine_info(threads or common.physical_cores())
    payload = {"benchmark": "speculative", "machine": machine,
               "backend": plain.backend_summary,
               "config": {"engine": str(target), "draft": str(draft), "k": args.k,
                          "max_tokens": args.max_tokens, "quick": args.quick},
               "prompt_lookup_batch1": lookup, "int4_draft_batch1": draft_row,
               "concurrency": rows}
    lines = ["| workload | plain tok/s | speculative tok/s | speedup | acceptance | identical |",
             "|---|---|---|---|---|---|"]
    for name, r in (("prompt lookup, batch 1 (quoting prompts)", lookup),
                    ("int4-awq draft, batch 1 (chat)", draft_row)):
        if r is None:
            continue
        lines.append(f"| {name} | {r['plain']['tok_s']} | {r['speculative']['tok_s']} | "
                     f"{r['speedup']}x | {r['acceptance_rate']} | {r['identical']} |")
    lines += ["", "| concurrent | plain tok/s | ngram forced | ngram adaptive | identical |",
              "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['plain']} | {r['ngram_forced']} "
                     f"({r['ngram_forced_ratio']}x) | {r['ngram_adaptive']} "
                     f"({r['ngram_adaptive_ratio']}x) | {r['identical']} |")
    payload["table"] = "\n".join(lines)
    common.write_json(args.out, payload)
    try:
        if rows:
            plot(payload, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(f"{common.cpu_line(machine)}\n{plain.backend_summary}\n\n{payload['table']}")
    print(f"wrote {args.out}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
