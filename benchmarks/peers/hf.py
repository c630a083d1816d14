#!/usr/bin/env python
"""HF transformers eager, fp32 or bf16: batch-1 decode, static batch, TTFT, JSON to --json-out.

The checkpoint is a plain HF one converted once from the GGUF and cached under --cache. Run by
benchmarks/cpu_peers.py as `python -P benchmarks/peers/hf.py --precision fp32 --gguf FILE ...`
with its working directory outside the repository: transformers imports Hugging Face's
`kernels` package, which the repository's kernels/ folder would otherwise shadow.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

# This folder only (never the repository root, whose builder/, runtime/ and kernels/ would
# shadow installed packages): -P keeps it off sys.path, so it goes on by hand.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def measure(args) -> C.Measurement:
    C.require("transformers", "torch")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    hf_dir = C.ensure_hf_dir(args.gguf, args.cache)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype,
                                                 attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    text = tok.apply_chat_template(C.MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    res = C.Measurement(precision=args.precision)

    class StepTimes(BaseStreamer):
        """generate() calls put() with the prompt, then after each step's argmax."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def run(prompt_ids: list[int], batch: int, n: int) -> tuple[list[float], int]:
        x = torch.tensor([prompt_ids] * batch, dtype=torch.long)
        timer = StepTimes() if batch == 1 else None  # the streamer takes batch 1 only
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                 do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=pad_id, streamer=timer)
        return (timer.times if timer else []), out.shape[1] - x.shape[1]

    run(ids, 1, C.WARMUP_TOKENS)
    times, _ = run(ids, 1, args.max_tokens)
    res.batch1_tok_s, res.batch1_tokens = C.decode_rate(times), len(times)
    if not args.no_concurrent:
        t0 = time.perf_counter()
        _, new = run(ids, args.concurrency, args.max_tokens)
        res.concurrent_tokens = new * args.concurrency
        res.concurrent_tok_s = res.concurrent_tokens / (time.perf_counter() - t0)
        res.notes.append(f"concurrent = static batch of {args.concurrency} copies of the prompt")
    res.ttft_s = C.timed_median(lambda p: run(p, 1, 1), C.ttft_prompts(length=args.ttft_tokens))
    return res


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--precision", choices=("fp32", "bf16"), required=True)
    p.add_argument("--gguf", type=Path, required=True,
                   help="the GGUF the cached HF checkpoint is made from (once)")
    return C.run_main(p, measure, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
