#!/usr/bin/env python
"""onnxruntime-genai int4: batch-1 decode, static batch, TTFT, one JSON to --json-out.

The int4 model comes from onnxruntime-genai's own model builder, run once on a plain HF
checkpoint converted from the GGUF and cached under --cache. Run by benchmarks/cpu_peers.py as
`python -P benchmarks/peers/ortgenai.py --gguf FILE ...` in its own process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# This folder only (never the repository root, whose builder/, runtime/ and kernels/ would
# shadow installed packages): -P keeps it off sys.path, so it goes on by hand.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def ensure_model(gguf: Path, cache: Path) -> Path:
    out = cache / "smollm2-135m-instruct-ortgenai-int4-cpu"
    if (out / "genai_config.json").is_file():
        return out
    try:
        C.require("onnx_ir", "onnx")
    except C.Skip as e:
        raise C.Skip(f"the onnxruntime-genai model builder needs a package: {e}") from None
    hf_dir = C.ensure_hf_dir(gguf, cache)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # -P and our cwd (outside the repository): no repo folder can shadow a package
    cmd = [sys.executable, "-P", "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
           "-o", str(tmp), "-p", "int4", "-e", "cpu", "-c", str(cache / "ortgenai-builder-cache")]
    C.log(f"building the onnxruntime-genai int4 model at {out} (once): {' '.join(cmd)}")
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise C.Skip(f"onnxruntime-genai builder failed (exit {proc.returncode}): "
                     + " | ".join(tail))
    tmp.rename(out)
    return out


def measure(args) -> C.Measurement:
    C.require("onnxruntime_genai", "numpy")
    import numpy as np
    import onnxruntime_genai as og

    model_dir = ensure_model(args.gguf, args.cache)
    res = C.Measurement(precision="int4")
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    tok = og.Tokenizer(model)
    prompt = tok.apply_chat_template(json.dumps(C.MESSAGES), add_generation_prompt=True)
    ids = [int(t) for t in tok.encode(prompt)]

    def run(prompt_ids: list[int], batch: int, n: int) -> list[float]:
        """Greedy, a static batch of `batch` copies; min_length = max_length masks EOS until
        the end, so each row makes n tokens. Returns a timestamp per generated step."""
        total = len(prompt_ids) + n
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total,
                                  batch_size=batch)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([prompt_ids] * batch, dtype=np.int32))
        times: list[float] = []
        while not gen.is_done() and len(times) < n:
            gen.generate_next_token()
            times.append(time.perf_counter())
        del gen
        return times

    run(ids, 1, C.WARMUP_TOKENS)
    times = run(ids, 1, args.max_tokens)
    res.batch1_tok_s, res.batch1_tokens = C.decode_rate(times), len(times)
    if not args.no_concurrent:
        t0 = time.perf_counter()
        try:
            times = run(ids, args.concurrency, args.max_tokens)
        except RuntimeError as e:  # the builder's genai_config caps the batch (32 on CPU)
            res.notes.append(f"concurrent: {e}")
        else:
            res.concurrent_tokens = len(times) * args.concurrency
            res.concurrent_tok_s = res.concurrent_tokens / (time.perf_counter() - t0)
            res.notes.append(f"concurrent = static batch of {args.concurrency} copies of the "
                             "prompt")
    res.ttft_s = C.timed_median(lambda p: run(p, 1, 1), C.ttft_prompts(length=args.ttft_tokens))
    return res


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, required=True,
                   help="the GGUF the cached HF checkpoint is made from (once)")
    return C.run_main(p, measure, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
