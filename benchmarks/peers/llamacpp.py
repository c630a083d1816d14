#!/usr/bin/env python
"""llama.cpp (llama-cpp-python) on a GGUF: batch-1 decode and TTFT, one JSON to --json-out.

Run by benchmarks/cpu_peers.py as `python -P benchmarks/peers/llamacpp.py --gguf FILE ...` in
its own process, so a build of llama.cpp with instructions this CPU lacks (SIGILL) loses only
this row. Build it with explicit ISA flags: `python benchmarks/cpu_peers.py --install-peers`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# This folder only (never the repository root, whose builder/, runtime/ and kernels/ would
# shadow installed packages): -P keeps it off sys.path, so it goes on by hand.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def measure(args) -> C.Measurement:
    C.require("llama_cpp")
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    path: Path = args.gguf
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=512, verbose=False)
    res = C.Measurement(precision=path.stem.rsplit(".", 1)[-1])  # Q4_1
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise C.Skip(f"{path.name} has no chat template")

    def special(token: int) -> str:
        return llm.detokenize([token], special=True).decode(errors="replace")

    prompt = Jinja2ChatFormatter(template, eos_token=special(llm.token_eos()),
                                 bos_token=special(llm.token_bos()))(messages=C.MESSAGES).prompt
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)

    def run(prompt_ids: list[int], n: int) -> list[float]:
        """Greedy; Llama.generate never stops at EOS (create_completion does), so every run
        makes exactly n tokens. reset() first: no KV prefix reuse between runs."""
        llm.reset()
        times: list[float] = []
        gen = llm.generate(list(prompt_ids), top_k=1, temp=0.0, repeat_penalty=1.0)
        for _ in gen:
            times.append(time.perf_counter())
            if len(times) >= n:
                break
        gen.close()
        return times

    run(ids, C.WARMUP_TOKENS)
    times = run(ids, args.max_tokens)
    res.batch1_tok_s, res.batch1_tokens = C.decode_rate(times), len(times)
    res.ttft_s = C.timed_median(lambda p: run(p, 1), C.ttft_prompts(length=args.ttft_tokens))
    res.notes.append("no concurrent run: llama-cpp-python's Llama decodes one sequence")
    return res


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, required=True)
    return C.run_main(p, measure, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
