"""A batch job: score every line of a JSONL file ({"text": ...}) with the engine and write
each line's token count, mean log-probability and perplexity (the prompt's own logprobs, as
evaluation harnesses score text).

    python examples/score_jsonl.py engines/smollm2 in.jsonl out.jsonl
"""

from __future__ import annotations

import json
import math
import sys

from llm_engine import Engine, SamplingParams


def score(engine_dir: str, src: str, dst: str) -> int:
    engine = Engine.load(engine_dir, kv_cache_memory=256 << 20)
    with open(src) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # max_tokens=1: we only want the prompt's logprobs; every line runs in one batch
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = engine.generate([r["text"] for r in rows], params)
    with open(dst, "w") as f:
        for row, out in zip(rows, outs):
            ids = out.prompt_token_ids
            # prompt_logprobs[i] holds token i's logprob given the tokens before it
            lps = [entry[tok] for tok, entry in zip(ids[1:], out.prompt_logprobs[1:])]
            mean = sum(lps) / len(lps) if lps else 0.0
            f.write(json.dumps({**row, "tokens": len(ids), "mean_logprob": round(mean, 4),
                                "perplexity": round(math.exp(-mean), 3)}) + "\n")
    return len(rows)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python examples/score_jsonl.py ENGINE_DIR IN.jsonl OUT.jsonl")
    print(f"scored {score(*sys.argv[1:])} lines", file=sys.stderr)
