#!/usr/bin/env python
"""What structured outputs cost: SmolLM2 decode speed with and without a grammar, side by side
in one process.

Each request makes exactly --max-tokens tokens: the constrained ones follow a JSON schema whose
one string field is long enough never to close first (so the grammar masks every step), the
plain ones ignore EOS. Decode tok/s is tokens after the first over the time after the first
token (each Output's metrics), at batch 1 (the median of --reps alternating runs) and with
64 requests at once (alternating rounds). The overhead is 1 - constrained / plain. Writes
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

    eng = Engine.load(ensure_engine(args.engine, dtype="float32"), kv_cache_memory=1 << 30)
    prompt = chat(eng, PROMPT)
    plain = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    json_ = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                           structured={"json": SCHEMA})
    eng.generate([prompt], json_)  # compiles once (cached) and warms up
    rows = []
    for batch, reps in ((1, args.reps), (args.concurrency, max(1, args.reps // 2))):
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
    machine = common.machine_info(int(eng.backend_info.get("threads", 0) or 1))
    lines = ["| concurrent requests | plain tok/s | json_schema tok/s | mask overhead |",
             "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['plain_tok_s']} | {r['json_schema_tok_s']} | "
              f"{r['overhead_pct']}% |" for r in rows]
    payload = {"benchmark": "structured", "machine": machine, "backend": eng.backend_summary,
               "config": {"max_tokens": args.max_tokens, "schema": SCHEMA, "quick": args.quick},
               "rows": rows, "table": "\n".join(lines)}
    common.write_json(args.out, payload)
    print(f"{common.cpu_line(machine)}\n{eng.backend_summary}\n\n{payload['table']}")
    return payload


if __name__ == "__main__":
    main()
