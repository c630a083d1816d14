#!/usr/bin/env python
"""What structured outputs cost: SmolLM2 decode speed with and without a grammar, side by side
in one process.

Each request makes exactly --max-tokens tokens: the constrained ones follow a JSON schema whose
one string field is long enough never to close first (so the grammar masks every step), the
plain ones ignore EOS. Decode tok/s is tokens after the first over the time after the first
token (each Output's metrics), at batch 1 (the median of --reps alternating runs) and with
64 requests at once (alternating rounds). The overhead is 1 - constrained / plain.

Then speculation under a grammar: a paper's metadata extracted into a JSON schema (the output
copies the prompt, where prompt lookup pays), greedy at batch 1, with and without
--speculative ngram on a second engine; the outputs must be token-identical. Writes
benchmarks/results/structured.json.

    python -P benchmarks/structured.py [--engine engines/smollm2] [--max-tokens 128] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "ops"))
import common

DEFAULT_OUT = common.RESULTS / "structured.json"
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
          "required": ["story"], "additionalProperties": False}
PROMPT = "Tell me a long story about a lighthouse keeper, as JSON."
PAPER = {"type": "object", "properties": {
    "title": {"type": "string"}, "authors": {"type": "array", "items": {"type": "string"}},
    "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    "venue": {"type": "string"}, "abstract": {"type": "string"}},
    "required": ["title", "authors", "year", "venue", "abstract"],
    "additionalProperties": False}
DOCUMENT = (
    "Title: Paged Attention for Serving Language Models on Small Machines\n"
    "Authors: Maria Lopez, Wei Zhang, Ahmed Hassan, Julia Novak\n"
    "Published at the Conference on Systems for Machine Learning, 2025.\n"
    "Abstract: Serving large language models needs memory for the key-value cache of every "
    "request in flight. We store the cache in fixed-size blocks, allocate them on demand and "
    "share the blocks of common prompt prefixes between requests. On a two-core machine "
    "this serves four times as many concurrent requests as contiguous allocation, with the "
    "same latency for a single request, and it makes preemption and speculative decoding "
    "cheap because a request's blocks can be released or truncated one at a time.")
EXTRACT = ("Extract the title, the authors, the year, the venue and the abstract (word for word) "
           "of this paper as JSON.\n\n" + DOCUMENT)


def _decode(outs) -> float:
    tokens = sum(len(o.token_ids) - 1 for o in outs)
    return tokens / sum(o.metrics["finish"] - o.metrics["first_token"] for o in outs)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, default=common.REPO / "engines" / "smollm2")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.concurrency, args.reps = 16, 4, 1

    sys.path.insert(0, str(common.REPO / "benchmarks"))
    from speculative import chat, ensure_engine

    from llm_engine.runtime import Engine, SamplingParams

    path = ensure_engine(args.engine, dtype="float32")
    eng = Engine.load(path, kv_cache_memory=1 << 30)
    prompt = chat(eng, PROMPT)
    plain = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    json_ = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                           structured={"json": SCHEMA})
    eng.generate([prompt], json_)  # compiles once (cached) and warms up
    rows = []
    # an odd count at 64 too: the median of two rounds is the slower one
    for batch, reps in ((1, args.reps), (args.concurrency, max(1, args.reps // 2) | 1)):
        rates: dict[str, list[float]] = {"plain": [], "json_schema": []}
        for _ in range(reps):
            for name, params in (("plain", plain), ("json_schema", json_)):
                t0 = time.perf_counter()
                outs = eng.generate([prompt] * batch, params)
                wall = time.perf_counter() - t0
                assert all(len(o.token_ids) == args.max_tokens for o in outs), name
                rates[name].append(_decode(outs) if batch == 1 else
                                   sum(len(o.token_ids) for o in outs) / wall)
        med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
        rows.append({"batch": batch, "plain_tok_s": round(med["plain"], 2),
                     "json_schema_tok_s": round(med["json_schema"], 2),
                     "overhead_pct": round(100 * (1 - med["json_schema"] / med["plain"]), 2)})
    # --quick runs on tiny test engines too: a short document fits their context
    speculative = _speculation_row(args, path, eng,
                                   chat(eng, EXTRACT[:300] if args.quick else EXTRACT))
    machine = common.machine_info(int(eng.backend_info.get("threads", 0) or 1))
    lines = ["| concurrent requests | plain tok/s | json_schema tok/s | mask overhead |",
             "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['plain_tok_s']} | {r['json_schema_tok_s']} | "
              f"{r['overhead_pct']}% |" for r in rows]
    spec_lines = ["| JSON schema extraction, batch 1 | decode tok/s | tokens | identical |",
                  "|---|---|---|---|",
                  f"| no speculation | {speculative['plain_tok_s']} | "
                  f"{speculative['tokens']} | |",
                  f"| prompt lookup (ngram, K={speculative['k']}) | "
                  f"{speculative['ngram_tok_s']} | {speculative['tokens']} | "
                  f"{speculative['identical']} |"]
    payload = {"benchmark": "structured", "machine": machine, "backend": eng.backend_summary,
               "config": {"max_tokens": args.max_tokens, "schema": SCHEMA, "quick": args.quick},
               "rows": rows, "table": "\n".join(lines), "speculative": speculative,
               "speculative_table": "\n".join(spec_lines)}
    common.write_json(args.out, payload)
    print(f"{common.cpu_line(machine)}\n{eng.backend_summary}\n\n{payload['table']}\n\n"
          f"{payload['speculative_table']}\nspeedup {speculative['speedup']}x, acceptance "
          f"{speculative['acceptance_rate']}")
    return payload


def _speculation_row(args, path: Path, eng, prompt: str) -> dict[str, Any]:
    """Greedy extraction under PAPER at batch 1, plain and with prompt lookup: median decode
    tok/s of --reps alternating runs, and whether the two outputs are token-identical."""
    from llm_engine.runtime import Engine, SamplingParams

    k = 4
    spec = Engine.load(path, kv_cache_memory=1 << 28, speculative="ngram",
                       num_speculative_tokens=k)
    params = SamplingParams(temperature=0, max_tokens=64 if args.quick else 256,
                            structured={"json": PAPER})
    rates: dict[str, list[float]] = {"plain": [], "ngram": []}
    outs = {}
    for engine in (eng, spec):
        engine.generate([prompt], params)  # warm-up (and the grammar compile)
    spec.speculator.stats = type(spec.speculator.stats)()
    for _ in range(args.reps):
        for name, engine in (("plain", eng), ("ngram", spec)):
            outs[name] = engine.generate([prompt], params)[0]
            rates[name].append(_decode([outs[name]]))
    med = {name: sorted(v)[len(v) // 2] for name, v in rates.items()}
    stats = spec.speculator.stats
    return {"k": k, "tokens": len(outs["plain"].token_ids),
            "finish_reason": outs["plain"].finish_reason,
            "plain_tok_s": round(med["plain"], 2), "ngram_tok_s": round(med["ngram"], 2),
            "speedup": round(med["ngram"] / med["plain"], 2),
            "identical": outs["plain"].token_ids == outs["ngram"].token_ids,
            "acceptance_rate": round(stats.acceptance_rate, 3),
            "grammar_cut": stats.grammar_cut, "text": outs["plain"].text}


if __name__ == "__main__":
    main()
