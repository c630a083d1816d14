#!/usr/bin/env python
"""Multi-rank SmolLM2 engines on this host: one rank with all cores against `--tp 2` and
`--pp 2` with the cores divided between the ranks (one thread each on a 2-core box).

For each layout the engine is built if missing (`engines/smollm2{,-tp2,-pp2}`), loaded (rank 0
here, the other rank spawned by the runtime) and measured in the same run:

* batch-1 decode: one prompt, --output-tokens greedy tokens; tokens/s over the decode phase
  (first token to last) and TTFT;
* concurrent: --concurrency prompts added at once, each making --output-tokens tokens; aggregate
  generated tokens/s from the first add to the last finish;
* for pipeline engines, the runtime's measured bubble fraction (share of stage-time idle).

Every request makes exactly --output-tokens tokens (ignore_eos). Writes <out>/parallel.json and
prints a markdown table; progress goes to stderr.

    python benchmarks/parallel.py [--output-tokens 64] [--concurrency 16] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The sibling scripts, never the repository root: there builder/, runtime/, kernels/ would
# shadow installed packages of those names (HF's `kernels`).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import QUESTIONS  # noqa: E402

PROMPTS = QUESTIONS[:8]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ensure(path: Path, **layout) -> Path:
    if (path / "engine.json").is_file():
        meta = json.loads((path / "engine.json").read_text())
        if meta.get("parallel", {"tp": 1, "pp": 1}) == {"tp": layout.get("tp", 1),
                                                        "pp": layout.get("pp", 1)}:
            return path
    from llm_engine.builder.build import BuildOptions, build_engine

    _log(f"building {path} ({layout or 'one rank'})")
    return build_engine(BuildOptions(model="smollm2", output=path, force=True, **layout))


def measure(path: Path, threads: int, output_tokens: int, concurrency: int) -> dict:
    from llm_engine import Engine, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    engine = Engine.load(path, threads=threads, max_num_seqs=max(concurrency, 1),
                         kv_cache_memory=256 << 20)
    load_s = time.perf_counter() - t0
    try:
        chats = [engine.apply_chat_template([{"role": "user", "content": p}])
                 for p in PROMPTS]
        engine.generate(chats[:1], SamplingParams(temperature=0, max_tokens=4))  # warm up
        out = engine.generate(chats[:1], params)[0]
        m = out.metrics
        ttft = m["first_token"] - m["arrival"]
        decode_tps = (len(out.token_ids) - 1) / (m["finish"] - m["first_token"])
        start = time.perf_counter()
        outs = engine.generate([chats[i % len(chats)] for i in range(concurrency)], params)
        wall = time.perf_counter() - start
        conc_tps = sum(len(o.token_ids) for o in outs) / wall
        pipeline = engine.pipeline_stats
    finally:
        engine.close()
    return {"load_s": round(load_s, 2), "ttft_s": round(ttft, 3),
            "batch1_decode_tok_s": round(decode_tps, 2),
            f"c{concurrency}_tok_s": round(conc_tps, 2),
            "bubble_fraction": pipeline["bubble_fraction"] if pipeline else None,
            "text": out.text[:80]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    layouts = [
        ("tp=1", REPO / "engines" / "smollm2", {}, cores),
        ("tp=2", REPO / "engines" / "smollm2-tp2", {"tp": 2}, max(1, cores // 2)),
        ("pp=2", REPO / "engines" / "smollm2-pp2", {"pp": 2}, max(1, cores // 2)),
    ]
    rows = []
    for name, path, layout, threads in layouts:
        _ensure(path, **layout)
        _log(f"measuring {name} ({threads} thread(s) per rank)")
        result = measure(path, threads, args.output_tokens, args.concurrency)
        rows.append({"layout": name, "ranks": 1 if not layout else 2,
                     "threads_per_rank": threads, **result})
        _log(json.dumps(rows[-1]))
    base = rows[0]
    key = f"c{args.concurrency}_tok_s"
    for r in rows:
        r["batch1_vs_tp1"] = round(r["batch1_decode_tok_s"] / base["batch1_decode_tok_s"], 2)
        r[f"c{args.concurrency}_vs_tp1"] = round(r[key] / base[key], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "host": {"cores": cores, "machine": platform.machine()},
              "command": "python benchmarks/parallel.py " + " ".join(sys.argv[1:]),
              "output_tokens": args.output_tokens, "concurrency": args.concurrency,
              "rows": rows}
    (args.out / "parallel.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"| layout | ranks × threads | batch-1 decode tok/s | {args.concurrency} concurrent "
          "tok/s | TTFT s | bubble |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        bubble = f"{r['bubble_fraction']:.2f}" if r["bubble_fraction"] is not None else "–"
        print(f"| {r['layout']} | {r['ranks']} × {r['threads_per_rank']} | "
              f"{r['batch1_decode_tok_s']:.1f} ({r['batch1_vs_tp1']:.2f}×) | "
              f"{r[key]:.1f} ({r[f'c{args.concurrency}_vs_tp1']:.2f}×) | {r['ttft_s']:.2f} | "
              f"{bubble} |")


if __name__ == "__main__":
    main()
