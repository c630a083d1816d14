"""How an `engine` command loads its engine: the shared options, and the load behind them.

`engine run`, `eval`, `serve` (runtime.cli) and `bench` (runtime.bench_cli) take the same
engine-loading options and report a bad value the same way, so those live here, apart from any
one command; `_fail` is their one-line `error: ...` exit (status 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from llm_engine.runtime.engine_dir import EngineLoadError
from llm_engine.runtime.speculative.speculator import MAX_SPECULATIVE_TOKENS, METHODS

_DEFAULT_K = 4  # EngineConfig.num_speculative_tokens


def _fail(message: str) -> None:
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(2)


def read_json_schema(path: Path) -> Any:
    """`--json-schema FILE` as a structured-output spec, or a one-line error naming the file
    and the problem."""
    from llm_engine.runtime.structured.spec import StructuredSpec

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        _fail(f"cannot read --json-schema {path}: {e.strerror}")
    except UnicodeDecodeError:
        _fail(f"--json-schema {path} is not UTF-8 text")
    try:
        schema = json.loads(text)
    except ValueError as e:
        _fail(f"--json-schema {path} is not valid JSON: {e}")
    try:
        return StructuredSpec("json", schema)
    except (ValueError, RecursionError) as e:
        _fail(f"--json-schema {path}: {e}")


def engine_options(fn):
    """Options shared by run, serve and bench: how the engine is loaded."""
    options = [
        click.option("--kv-cache-memory", type=str, default=None,
                     help="KV cache size: bytes (e.g. 512MiB, 2GB) or a fraction of free "
                          "memory (e.g. 0.3). Default: min(2 GiB, half of free memory)."),
        click.option("--block-size", type=int, default=16, show_default=True,
                     help="Tokens per KV-cache block."),
        click.option("--max-num-seqs", type=int, default=64, show_default=True,
                     help="Most sequences in one batch."),
        click.option("--max-batch-tokens", type=int, default=None,
                     help="Most tokens in one batch (default: the engine's build setting)."),
        click.option("--no-prefix-caching", is_flag=True, help="Disable prefix caching."),
        click.option("--kernels", type=click.Choice(["auto", "reference", "triton", "onnx"]),
                     default="auto", show_default=True,
                     help="Step backend: the engine's Triton kernels (default on CUDA), its "
                          "ONNX graph on onnxruntime (default on CPU when the engine has one), "
                          "or the torch reference ops."),
        click.option("--threads", type=int, default=None,
                     help="CPU threads per rank: onnxruntime's pool on the ONNX backend, "
                          "torch's otherwise (default: the cores; a multi-rank engine divides "
                          "them among its ranks)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def speculative_options(fn):
    """Speculative decoding options of run, serve and bench (not eval: it scores, never
    decodes). Defaults are None so that a tuning option without --speculative is an error,
    not silently ignored."""
    options = [
        click.option("--speculative", type=str, default=None, metavar="[ngram|draft]",
                     help="Speculative decoding: 'ngram' drafts from the prompt and output so "
                          "far (prompt lookup), 'draft' from --draft-engine. Default: off."),
        click.option("--num-speculative-tokens", type=int, default=None,
                     help=f"K: the most drafted tokens per request and step (1.."
                          f"{MAX_SPECULATIVE_TOKENS}; default {_DEFAULT_K}); fewer, or none, "
                          "where measured acceptance and step cost say they do not pay."),
        click.option("--draft-engine", type=click.Path(path_type=Path), default=None,
                     help="Engine directory that drafts for --speculative draft (a smaller or "
                          "int4 build with the same tokenizer)."),
        click.option("--ngram-min", type=int, default=None,
                     help="--speculative ngram: shortest suffix matched (default 2)."),
        click.option("--ngram-max", type=int, default=None,
                     help="--speculative ngram: longest suffix matched (default 4)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def speculative_config(speculative: str | None, num_speculative_tokens: int | None,
                       draft_engine: Path | None, ngram_min: int | None,
                       ngram_max: int | None) -> dict[str, Any]:
    """The EngineConfig fields of the --speculative options, checked before the (slow) engine
    load so that a mistake costs nothing; errors name the flags, not the config fields."""
    given = {"--num-speculative-tokens": num_speculative_tokens,
             "--draft-engine": draft_engine, "--ngram-min": ngram_min, "--ngram-max": ngram_max}
    if speculative is None:
        stray = [name for name, value in given.items() if value is not None]
        if stray:
            _fail(f"{stray[0]} needs --speculative ngram or --speculative draft")
        return {}
    if speculative not in METHODS:
        _fail(f"--speculative {speculative!r}: choose one of {', '.join(METHODS)}")
    k = _DEFAULT_K if num_speculative_tokens is None else num_speculative_tokens
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        _fail(f"--num-speculative-tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {k}")
    if speculative == "draft":
        _check_draft_options(draft_engine, ngram_min, ngram_max)
        return {"speculative": "draft", "num_speculative_tokens": k,
                "draft_engine": str(draft_engine)}
    if draft_engine is not None:
        _fail("--draft-engine is for --speculative draft")
    lo = 2 if ngram_min is None else ngram_min
    hi = max(4, lo) if ngram_max is None else ngram_max  # --ngram-min 6 alone: max follows
    if not 1 <= lo <= hi <= 16:
        _fail(f"--ngram-min and --ngram-max must satisfy 1 <= min <= max <= 16, got {lo} "
              f"and {hi}")
    return {"speculative": "ngram", "num_speculative_tokens": k, "ngram_min": lo,
            "ngram_max": hi}


def _check_draft_options(draft_engine: Path | None, ngram_min: int | None,
                         ngram_max: int | None) -> None:
    if draft_engine is None:
        _fail("--speculative draft needs --draft-engine DIR (an engine directory with the "
              "target's tokenizer)")
    if ngram_min is not None or ngram_max is not None:
        _fail("--ngram-min and --ngram-max are for --speculative ngram")
    # The engine's own message would not say which of the two directories is missing.
    if not (draft_engine / "engine.json").is_file():
        _fail(f"--draft-engine {draft_engine} is not an engine directory; build one with "
              "`engine build`")


def speculative_summary(engine: Any) -> str | None:
    """`ngram, K=4 (adaptive)` / `draft DIR, K=4`: the engine's speculation; None when off."""
    spec = getattr(engine, "speculator", None)
    if spec is None:
        return None
    c = spec.config
    method = f"draft {c.draft_engine}" if c.method == "draft" else "ngram"
    return f"{method}, K={c.num_tokens}{' (adaptive)' if c.adaptive else ''}"


def speculative_result(engine: Any) -> str | None:
    """The end-of-run line on speculation: how many drafts were kept; None when off."""
    spec = getattr(engine, "speculator", None)
    if spec is None:
        return None
    s = spec.stats
    return (f"speculative: {s.accepted}/{s.proposed} drafted tokens accepted "
            f"({s.acceptance_rate:.0%}), {s.mean_accepted_length:.2f} tokens per verified step")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def parse_memory(text: str) -> dict[str, Any]:
    """'0.3' -> fraction of free memory; '512MiB' / '2GB' / '1000000' -> bytes."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("kmgib")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size; use e.g. 512MiB, 2GB or 0.3") \
            from None
    if unit not in _UNITS:
        raise click.BadParameter(f"unknown unit in {text!r}; use B, KB, MB, GB, KiB, MiB, GiB")
    if unit == "" and 0 < value < 1:
        return {"kv_cache_fraction": value}
    if value <= 0:
        raise click.BadParameter(f"KV cache size must be positive, got {text!r}")
    return {"kv_cache_memory": int(value * _UNITS[unit])}


def load_engine(engine_dir: Path, kv_cache_memory, block_size, max_num_seqs, max_batch_tokens,
                no_prefix_caching, kernels="auto", threads=None, quiet: bool = False,
                speculative: str | None = None, num_speculative_tokens: int | None = None,
                draft_engine: Path | None = None, ngram_min: int | None = None,
                ngram_max: int | None = None):
    from llm_engine.runtime.engine import Engine

    if threads is not None and threads < 1:
        _fail(f"--threads must be >= 1, got {threads}")
    options: dict[str, Any] = {"block_size": block_size, "max_num_seqs": max_num_seqs,
                               "max_batch_tokens": max_batch_tokens,
                               "prefix_caching": not no_prefix_caching, "kernels": kernels,
                               "threads": threads}
    options.update(speculative_config(speculative, num_speculative_tokens, draft_engine,
                                      ngram_min, ngram_max))
    if kv_cache_memory is not None:
        try:
            options.update(parse_memory(kv_cache_memory))
        except click.BadParameter as e:  # raised outside option parsing: click would print usage
            _fail(f"--kv-cache-memory: {e.message}")
    try:
        engine = Engine.load(engine_dir, **options)
    except (EngineLoadError, ValueError) as e:
        _fail(str(e))
    if not quiet:
        click.echo(f"KV cache: {engine.kv_cache_summary}; backend: {engine.backend_summary}",
                   err=True)
        spec = speculative_summary(engine)
        if spec is not None:
            click.echo(f"Speculative: {spec}", err=True)
    return engine
