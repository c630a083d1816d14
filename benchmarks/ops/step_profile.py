#!/usr/bin/env python
"""Where a decode step's time goes, node by node: this engine's CPU fast-path graph
against onnxruntime-genai's model of the same network, both run by onnxruntime and profiled
by its own profiler.

For each engine directory (`--engine`, any number) and for onnxruntime-genai's int4 model
(`--genai`, the folder benchmarks/peers/ortgenai.py builds and caches), the script:

1. times the decode steps of `--batch` sequences (default 1) after `--context`-token
   prompts, `--steps` tokens each, without the profiler: the
   session's own time per step (`session ms`), and for the engine also the whole step
   (`step ms`, sampling and the runtime's host work included);
2. runs the same steps under onnxruntime's profiler (the engine through
   `LLM_ENGINE_ORT_PROFILE`, a plain session for onnxruntime-genai's model), and sums each
   decode step's kernel times by kind of node: the GEMMs (the LM head on its own), attention,
   RoPE, norms, the gated activation and residual adds, and everything else (gathers,
   concatenations, reshapes, slices, casts: for this engine, mostly the paged cache's layout).

The profiler costs something inside every kernel's time: a Reshape, which only aliases its
input, measures ~5 us under it on a small VM. The 1st percentile of a profile's kernel times
(`floor us` in the JSON) is taken off every node before summing. Even so the profiled
kernels add up to more than the timed session (`profiled ÷ timed`, 1.2-1.6x on the 2-core
VM of the results: the profiler's work between nodes slows the kernels, the more so the more
nodes a step has), so the table splits the *timed* session ms by each kind's
share of the profiled kernel time; the JSON also has the raw sums (`kernel_ms`). The timed
passes run before and after the profiled one, and the faster is kept: on a shared machine
load from elsewhere only slows a pass down.

onnxruntime-genai's model runs here from a plain onnxruntime session, as its generator runs
it: past and present KV bound to one buffer per layer (`past_present_share_buffer`), one
token in, an attention mask as long as the context. Same threads and session options as the
fast path.

    python -P benchmarks/ops/step_profile.py --engine ENGINE_DIR [ENGINE_DIR ...] \\
        [--genai DIR] [--batch 1] [--context 256] [--steps 48] [--threads N] \\
        [--out benchmarks/results/step_profile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C

GENAI_DEFAULT = (Path.home() / ".cache" / "llm-engine-bench"
                 / "smollm2-135m-instruct-ortgenai-int4-cpu")
GEMM_OPS = {"MatMulNBits", "MatMul", "Gemm", "MatMulInteger", "FusedMatMul",
            "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLinear"}
KINDS = {
    "attention": {"Attention", "GroupQueryAttention", "MultiHeadAttention"},
    "rope": {"RotaryEmbedding"},
    "norm": {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
             "LayerNormalization", "SkipLayerNormalization"},
    "activation + residual": {"Sigmoid", "Mul", "QuickGelu", "Add", "Silu", "FastGelu"},
}
ORDER = ["GEMM", "LM head", "attention", "rope", "norm", "activation + residual", "layout"]


def kind_of(event: dict[str, Any], vocab: int) -> str:
    op = event["args"].get("op_name", "")
    if op in GEMM_OPS:
        shapes = event["args"].get("output_type_shape") or [{}]
        dims = next(iter(shapes[0].values()), [])
        return "LM head" if dims and dims[-1] == vocab else "GEMM"
    for kind, ops in KINDS.items():
        if op in ops:
            return kind
    return "layout"


def summarize(events: list[dict[str, Any]], skip: int, vocab: int) -> dict[str, Any]:
    """Per-step kernel milliseconds by kind, averaged over the model runs after the first
    `skip` (prefill and warm-up), plus nodes a step and the top op types."""
    runs = sorted((e for e in events if e.get("cat") == "Session"
                   and e.get("name") == "model_run"), key=lambda e: e["ts"])[skip:]
    if not runs:
        raise SystemExit("the profile has no decode runs (too few --steps?)")
    nodes = sorted((e for e in events if e.get("cat") == "Node"
                    and e.get("name", "").endswith("_kernel_time")), key=lambda e: e["ts"])
    # The profiler's own cost inside each kernel's time: the shortest kernels (a Reshape,
    # which only aliases its input) measure ~5 us under it on a small VM. Taken off every
    # node, so a kind's time is its kernels' work, comparable across graphs of very
    # different node counts.
    durs = sorted(e["dur"] for e in nodes)
    floor = float(durs[len(durs) // 100]) if durs else 0.0
    kinds = dict.fromkeys(ORDER, 0.0)
    ops: dict[str, float] = {}
    count = 0
    raw = 0.0
    i = 0
    for run in runs:
        lo, hi = run["ts"], run["ts"] + run["dur"]
        while i < len(nodes) and nodes[i]["ts"] < lo:
            i += 1
        while i < len(nodes) and nodes[i]["ts"] <= hi:
            e = nodes[i]
            work = max(e["dur"] - floor, 0.0)
            raw += e["dur"]
            kinds[kind_of(e, vocab)] += work
            op = e["args"].get("op_name", "?")
            ops[op] = ops.get(op, 0.0) + work
            count += 1
            i += 1
    n = len(runs)
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {"runs": n, "nodes_per_step": count / n,
            "kernel_ms": {k: v / n / 1e3 for k, v in kinds.items()},
            "kernel_ms_total": sum(kinds.values()) / n / 1e3,
            "profiled_kernel_ms_total": raw / n / 1e3, "profiler_floor_us": floor,
            "profiled_run_ms": sum(r["dur"] for r in runs) / n / 1e3,
            "top_ops_ms": {op: us / n / 1e3 for op, us in top}}


# ---------------------------------------------------------------------------- this engine
Steps = Iterator[tuple[float, float]]  # (session seconds, whole-step seconds) per step


def mean_ms(steps: Steps) -> tuple[float, float]:
    """Run the steps; their mean session and whole-step ms."""
    times = list(steps)
    if not times:
        raise SystemExit("no decode steps were timed (raise --steps)")
    return tuple(sum(t[i] for t in times) / len(times) * 1e3 for i in (0, 1))


def timed_around(run: Callable[[], Steps], profile: Callable[[], None]) -> tuple[float, float]:
    """Time the steps before and after the profiled run and keep the faster pass: on a
    shared machine, load from elsewhere only ever slows a pass down. (Interleaving the two
    runs step by step would not do: two onnxruntime pools spinning on the same cores slow
    each other down twofold.)"""
    before = mean_ms(run())
    profile()
    after = mean_ms(run())
    return min(before, after)


def engine_steps(path: Path, args, warm: dict[str, int]) -> tuple[Any, Callable[[], Steps]]:
    """Load the engine; and a function that runs --batch prompts of --context tokens and
    --steps greedy tokens each, giving the decode steps after every sequence's first (cold)
    one as a lazy iterator (and the model runs before them in warm["runs"])."""
    from llm_engine import Engine
    from llm_engine.runtime import SamplingParams

    engine = Engine.load(path, kernels="onnx", threads=args.threads)
    runner = engine.executor.runner
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)

    def steps() -> Steps:
        # --batch prompts that differ from their second token on (no prefix-cache sharing)
        for b in range(args.batch):
            engine.add_request([1] + [(1000 + 7 * b + i) % vocab
                                      for i in range(args.context - 1)], params)
        made: dict[str, int] = {}
        # the prefills (in chunks of the engine's token budget) and one decode step for all
        while engine.has_unfinished() and (len(made) < args.batch
                                           or min(made.values()) < 2):
            for out in engine.step():
                made[out.request_id] = len(out.token_ids)
        warm["runs"] = runner.steps
        while engine.has_unfinished():
            s0, t0 = runner.session_seconds, time.perf_counter()
            engine.step()
            yield runner.session_seconds - s0, time.perf_counter() - t0

    return engine, steps


def profile_engine(path: Path, args) -> dict[str, Any]:
    engine, run = engine_steps(path, args, {})
    profile: dict[str, Any] = {}

    def profiled() -> None:
        with tempfile.TemporaryDirectory(prefix="step_profile_") as tmp:
            os.environ["LLM_ENGINE_ORT_PROFILE"] = str(Path(tmp) / "engine")
            try:
                warm: dict[str, int] = {}
                other, other_run = engine_steps(path, args, warm)
            finally:
                del os.environ["LLM_ENGINE_ORT_PROFILE"]
            list(other_run())
            runner = other.executor.runner
            events = json.loads(Path(runner.session.end_profiling()).read_text())
        # runs: the prefills, then the first decode step the timed runs also leave out
        profile.update(summarize(events, skip=warm["runs"], vocab=runner.vocab))

    session_ms, step_ms = timed_around(run, profiled)
    build = json.loads((path / "engine.json").read_text()).get("build", {})
    quant = build.get("quant") or build.get("dtype") or "?"
    del engine
    return {**profile, "system": f"llm-engine {quant} ({path.name})", "engine": str(path),
            "session_ms": session_ms, "step_ms": step_ms}


# ------------------------------------------------------------------- onnxruntime-genai
def genai_steps(model_dir: Path, args, profile_prefix: str | None) -> tuple[Any, Steps, int]:
    """A session on onnxruntime-genai's model, bound as its generator binds it, and its
    decode steps after the first (cold) one as a lazy iterator."""
    import numpy as np

    config = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    sess = C.ort_session(model_dir / config["filename"], args.threads, profile_prefix)
    layers, kvh, d = (config["num_hidden_layers"], config["num_key_value_heads"],
                      config["head_size"])
    vocab = sess.get_outputs()[0].shape[-1]
    total = args.context + args.steps + 1
    rng = np.random.default_rng(0)
    io = sess.io_binding()
    caches = []  # one buffer per layer and half, past and present alike (share-buffer mode)
    for layer in range(layers):
        for half in ("key", "value"):
            buf = rng.standard_normal((args.batch, kvh, total, d), dtype=np.float32) * 0.1
            caches.append(buf)
            io.bind_input(f"past_key_values.{layer}.{half}", "cpu", 0, np.float32,
                          list(buf.shape), buf.ctypes.data)
            io.bind_output(f"present.{layer}.{half}", "cpu", 0, np.float32,
                           list(buf.shape), buf.ctypes.data)
    logits = np.empty((args.batch, 1, vocab), np.float32)
    io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
    ids = np.full((args.batch, 1), 1000, np.int64)
    io.bind_input("input_ids", "cpu", 0, np.int64, list(ids.shape), ids.ctypes.data)

    def steps() -> Steps:
        bound = caches  # the session holds their addresses: alive while it runs
        for k in range(args.steps + 1):
            mask = np.ones((args.batch, args.context + k + 1), np.int64)
            io.bind_input("attention_mask", "cpu", 0, np.int64, list(mask.shape),
                          mask.ctypes.data)
            t0 = time.perf_counter()
            sess.run_with_iobinding(io)
            spent = time.perf_counter() - t0
            ids[:, 0] = logits[:, 0].argmax(-1)
            if k:  # the first run (cold) is left out, as the engine's first decode step is
                yield spent, spent
        del bound

    return sess, steps(), vocab


def profile_genai(model_dir: Path, args) -> dict[str, Any]:
    profile: dict[str, Any] = {}

    def profiled() -> None:
        with tempfile.TemporaryDirectory(prefix="step_profile_") as tmp:
            sess, steps, vocab = genai_steps(model_dir, args, str(Path(tmp) / "genai"))
            list(steps)
            events = json.loads(Path(sess.end_profiling()).read_text())
        profile.update(summarize(events, skip=1, vocab=vocab))

    session_ms, _ = timed_around(lambda: genai_steps(model_dir, args, None)[1], profiled)
    return {**profile, "system": "onnxruntime-genai int4", "engine": str(model_dir),
            "session_ms": session_ms, "step_ms": None}


# ------------------------------------------------------------------------------ report
def finish(res: dict[str, Any]) -> dict[str, Any]:
    """The timed session ms split by the profile's shares of kernel time."""
    total = res["kernel_ms_total"] or 1.0
    res["session_ms_by_kind"] = {k: v / total * res["session_ms"]
                                 for k, v in res["kernel_ms"].items()}
    res["profiled_over_timed"] = total / res["session_ms"]
    return res


def table(results: list[dict[str, Any]]) -> str:
    head = ["system", "step ms", "session ms", "nodes"] + [f"{k} ms" for k in ORDER] + \
        ["profiled ÷ timed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        step = f"{r['step_ms']:.2f}" if r["step_ms"] is not None else "-"
        cells = [r["system"], step, f"{r['session_ms']:.2f}", f"{r['nodes_per_step']:.0f}"]
        cells += [f"{r['session_ms_by_kind'][k]:.2f}" for k in ORDER]
        cells.append(f"{r['profiled_over_timed']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, batch: int) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(results)))
    names = [r["system"] for r in results]
    left = [0.0] * len(results)
    colors = plt.get_cmap("tab10").colors
    for i, part in enumerate(ORDER):
        vals = [r["session_ms_by_kind"][part] for r in results]
        ax.barh(names, vals, left=left, label=part, color=colors[i % len(colors)])
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel(f"ms per decode step of {batch} sequence{'s' * (batch > 1)} inside "
                  "onnxruntime, split by the profile's kernel-time shares")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, nargs="*", default=[])
    p.add_argument("--genai", type=Path, default=GENAI_DEFAULT,
                   help="onnxruntime-genai model folder (benchmarks/peers/ortgenai.py builds "
                        "it); skipped when missing")
    p.add_argument("--context", type=int, default=256, help="prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=48, help="tokens made per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences decoding together")
    p.add_argument("--threads", type=int, default=C.physical_cores())
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/step_profile.json, "
                        "step_profile_b<B>.json for --batch B > 1); a .png beside it")
    args = p.parse_args(argv)
    if args.out is None:
        suffix = "" if args.batch == 1 else f"_b{args.batch}"
        args.out = C.RESULTS / f"step_profile{suffix}.json"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results = []
    for path in args.engine:
        print(f"profiling {path} ...", file=sys.stderr)
        results.append(finish(profile_engine(path, args)))
    if (args.genai / "genai_config.json").is_file():
        print(f"profiling onnxruntime-genai's model at {args.genai} ...", file=sys.stderr)
        results.append(finish(profile_genai(args.genai, args)))
    else:
        print(f"no onnxruntime-genai model at {args.genai}: skipped (run "
              "benchmarks/cpu_peers.py --peers ortgenai once to build it)", file=sys.stderr)
    if not results:
        raise SystemExit("nothing to profile: pass --engine DIR or build the genai model")
    machine = C.machine_info(args.threads)
    md = table(results)
    payload = {"machine": machine, "context": args.context, "steps": args.steps,
               "batch": args.batch,
               "results": results, "table": md}
    print(C.cpu_line(machine))
    print(f"decode, {args.batch} sequence(s), {args.context}-token prompts, {args.steps} steps")
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    plot(results, args.out.with_suffix(".png"), args.batch)
    return payload


if __name__ == "__main__":
    main()
