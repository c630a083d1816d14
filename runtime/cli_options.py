"""How an `engine` command loads its engine: the shared options, and the load behind them.

`engine run`, `eval`, `serve` (runtime.cli) and `bench` (runtime.bench_cli) take the same
engine-loading options and report a bad value the same way, so those live here, apart from any
one command; `_fail` is their one-line `error: ...` exit (status 2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from llm_engine.runtime.engine_dir import EngineLoadError


def _fail(message: str) -> None:
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(2)


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
                no_prefix_caching, kernels="auto", threads=None, quiet: bool = False):
    from llm_engine.runtime.engine import Engine

    if threads is not None and threads < 1:
        _fail(f"--threads must be >= 1, got {threads}")
    options: dict[str, Any] = {"block_size": block_size, "max_num_seqs": max_num_seqs,
                               "max_batch_tokens": max_batch_tokens,
                               "prefix_caching": not no_prefix_caching, "kernels": kernels,
                               "threads": threads}
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
    return engine
