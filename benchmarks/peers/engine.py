#!/usr/bin/env python
"""One llm-engine engine: batch-1 decode, concurrent requests, TTFT, one JSON to --json-out.

The only measurement script that imports the project, and it does so as installed
(`llm_engine`), never through the repository's folders: benchmarks/cpu_peers.py runs it as
`python -P benchmarks/peers/engine.py --engine-dir DIR --precision NAME ...` from outside the
repository, in its own process like every peer, so one engine's crash loses only its row.
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
    engine_dir: Path = args.engine_dir
    if not (engine_dir / "engine.json").is_file():
        raise C.Skip(f"{engine_dir} is not an engine directory (no engine.json); build it with "
                     f"`engine build smollm2 ...`")
    C.require("llm_engine")
    from llm_engine.runtime.engine import Engine
    from llm_engine.runtime.sampling_params import SamplingParams

    engine = Engine.load(engine_dir, kernels=args.kernels, threads=args.threads,
                         max_num_seqs=max(64, args.concurrency))
    res = C.Measurement(precision=args.precision)
    res.notes.append(f"kernels={args.kernels} -> {engine.kernel_backend}")
    prompt = engine.apply_chat_template(C.MESSAGES, add_generation_prompt=True)

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    engine.generate([prompt], params(C.WARMUP_TOKENS))
    times: list[float] = []
    counts: list[int] = []
    runner = engine.executor.runner
    timed = hasattr(runner, "session_seconds")  # the fast path counts its session time
    first = None
    for out in engine.stream(prompt, params(args.max_tokens)):
        if out.delta_token_ids:
            times.append(time.perf_counter())
            counts.append(len(out.token_ids))
            if first is None and timed:
                first = (runner.session_seconds, runner.steps)
    res.batch1_tok_s, res.batch1_tokens = C.decode_rate(times, counts), counts[-1]
    if first is not None and runner.steps - first[1] > 0:
        # the decode steps after the first token: wall time per step against session time
        steps = runner.steps - first[1]
        res.model_ms_per_step = (runner.session_seconds - first[0]) / steps * 1e3
        res.host_ms_per_step = (times[-1] - times[0]) / steps * 1e3 - res.model_ms_per_step
    if not args.no_concurrent:
        t0 = time.perf_counter()
        outs = engine.generate([prompt] * args.concurrency, params(args.max_tokens))
        res.concurrent_tokens = sum(len(o.token_ids) for o in outs)
        res.concurrent_tok_s = res.concurrent_tokens / (time.perf_counter() - t0)
        res.notes.append(f"concurrent = {args.concurrency} requests submitted at once")
    res.ttft_s = C.timed_median(lambda p: engine.generate([p], params(1)),
                                C.ttft_prompts(length=args.ttft_tokens))
    engine.close()
    return res


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, required=True)
    p.add_argument("--precision", required=True, help="the row's label: fp32, int4, int8-sq...")
    p.add_argument("--kernels", default="auto", help="Engine.load kernels (default auto)")
    return C.run_main(p, measure, project_allowed=True, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
