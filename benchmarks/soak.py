#!/usr/bin/env python
"""Soak test: thousands of requests at mixed concurrency with random aborts, then the books.

Requests go through `AsyncEngine` in waves of random concurrency (1..--max-concurrency); each
request has random prompt and output lengths and sampling settings, and a --abort-fraction of
them are cancelled part-way (the consuming coroutine is cancelled after a random number of
streamed chunks, as a client disconnect does). At the end it checks:

- every request is accounted for: it finished with a finish reason (stop / length / error) or
  was aborted by us, and none is still queued or running in the engine;
- every KV block is free again (reference counts zero; prefix-cached blocks count as free,
  they are evictable) and the block manager's invariants hold;
- resident memory after the run is within --max-rss-growth-mb of the level after the first
  wave (the first wave warms allocator pools and caches).

Exits 1 with the failed checks listed; writes a JSON report.

    python benchmarks/soak.py ENGINE_DIR [--requests 2000] [--max-concurrency 64]
        [--abort-fraction 0.2] [--seed 0] [--out benchmarks/results/soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _one(ae, rng: random.Random, vocab: int, abort_after: int | None,
               outcome: dict[str, Any]) -> None:
    from llm_engine.runtime.sampling_params import SamplingParams

    prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 48))]
    params = SamplingParams(max_tokens=rng.randint(1, 32),
                            temperature=rng.choice([0.0, 0.7, 1.0]),
                            top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1 << 30))
    chunks = 0
    try:
        async for out in ae.generate(prompt, params):
            chunks += 1
            if out.finished:
                outcome["finish"] = out.finish_reason
                return
            if abort_after is not None and chunks >= abort_after:
                outcome["finish"] = "aborted-by-client"
                return  # leaving the generator aborts the request, as a disconnect does
    except ValueError as e:  # a prompt the engine refuses is an answer too
        outcome["finish"] = f"refused: {e}"


async def soak(ae, requests: int, max_concurrency: int, abort_fraction: float, seed: int,
               on_wave=None) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    vocab = ae.engine.vocab_size
    outcomes: list[dict[str, Any]] = []
    while len(outcomes) < requests:
        width = min(rng.randint(1, max_concurrency), requests - len(outcomes))
        wave = [{"finish": None} for _ in range(width)]
        await asyncio.gather(*(
            _one(ae, random.Random(rng.randrange(1 << 30)), vocab,
                 rng.randint(1, 8) if rng.random() < abort_fraction else None, o)
            for o in wave))
        outcomes += wave
        if on_wave is not None:
            on_wave(len(outcomes))
    return outcomes


def check(engine, outcomes: list[dict[str, Any]], rss_after_first: float, rss_end: float,
          max_growth_mb: float) -> list[str]:
    problems = []
    lost = [i for i, o in enumerate(outcomes) if o["finish"] is None]
    if lost:
        problems.append(f"{len(lost)} requests ended without a finish reason: {lost[:5]}")
    if engine.num_unfinished:
        problems.append(f"{engine.num_unfinished} requests still queued or running")
    blocks = engine.blocks
    if blocks.num_free_blocks != engine.kv_spec.num_blocks:
        problems.append(f"{engine.kv_spec.num_blocks - blocks.num_free_blocks} KV blocks "
                        "still held")
    from llm_engine.runtime.block_manager import BlockManagerError

    try:
        blocks.check()
    except BlockManagerError as e:
        problems.append(f"block manager invariants: {e}")
    if rss_end - rss_after_first > max_growth_mb:
        problems.append(f"resident memory grew {rss_end - rss_after_first:.0f} MB after the "
                        f"first wave (allowed {max_growth_mb} MB)")
    return problems


def run(engine_dir: Path, requests: int, max_concurrency: int, abort_fraction: float,
        seed: int, max_rss_growth_mb: float, **engine_options) -> dict[str, Any]:
    from llm_engine.runtime.async_engine import AsyncEngine

    ae = AsyncEngine.load(str(engine_dir), max_num_seqs=max_concurrency, **engine_options)
    marks: dict[str, float] = {}

    def on_wave(done: int) -> None:
        marks.setdefault("rss_after_first_wave", _rss_mb())
        print(f"\r{done}/{requests} requests", end="", file=sys.stderr, flush=True)

    start = time.perf_counter()
    try:
        outcomes = asyncio.run(soak(ae, requests, max_concurrency, abort_fraction, seed,
                                    on_wave))
        # aborts are applied by the engine thread: let it drain them
        asyncio.run(ae.run_sync(lambda e: None))
        rss_end = _rss_mb()
        problems = check(ae.engine, outcomes, marks["rss_after_first_wave"], rss_end,
                         max_rss_growth_mb)
    finally:
        ae.shutdown()
    print(file=sys.stderr)
    finishes: dict[str, int] = {}
    for o in outcomes:
        key = o["finish"] if not str(o["finish"]).startswith("refused") else "refused"
        finishes[key] = finishes.get(key, 0) + 1
    return {"engine": str(engine_dir), "requests": requests, "max_concurrency": max_concurrency,
            "abort_fraction": abort_fraction, "seed": seed,
            "seconds": round(time.perf_counter() - start, 1), "finishes": finishes,
            "rss_mb_after_first_wave": round(marks["rss_after_first_wave"], 1),
            "rss_mb_end": round(rss_end, 1), "problems": problems, "ok": not problems}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine_dir", type=Path)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--max-concurrency", type=int, default=64)
    ap.add_argument("--abort-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    ap.add_argument("--kv-cache-memory", type=int, default=64 << 20)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args()
    report = run(args.engine_dir, args.requests, args.max_concurrency, args.abort_fraction,
                 args.seed, args.max_rss_growth_mb, kv_cache_memory=args.kv_cache_memory)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
