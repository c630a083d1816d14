"""`engine bench`: the load test of runtime.bench from the command line."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click

from llm_engine.runtime.cli_options import (
    _fail,
    engine_options,
    load_engine,
    speculative_options,
)


def _progress(label: str, total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="req", desc=label, file=sys.stderr, leave=False)
    return lambda: bar.update(1)


@click.command()
@click.argument("engine_dir", type=click.Path(path_type=Path), required=False)
@click.option("--url", default=None, help="Benchmark this OpenAI-compatible server instead "
              "(e.g. http://127.0.0.1:8000): ours, vLLM, llama.cpp's server...")
@click.option("--model", default=None, help="Model name to send with --url.")
@click.option("--api-key", default=None, help="Bearer key for --url.")
@click.option("--concurrency", "-c", type=int, multiple=True,
              help="Fixed concurrency level(s); repeat for a sweep. Default: 1 8 32 64.")
@click.option("--rate", type=float, multiple=True,
              help="Request rate(s) in req/s instead of a fixed concurrency.")
@click.option("--arrivals", type=click.Choice(["poisson", "fixed"]), default="poisson",
              show_default=True, help="Inter-arrival gaps at --rate.")
@click.option("--num-requests", "-n", type=int, default=None,
              help="Requests per level (default: 2 x concurrency, at least 8; 32 at a rate).")
@click.option("--input-tokens", type=int, default=32, show_default=True,
              help="Synthetic prompt length (words, about one token each).")
@click.option("--output-tokens", type=int, default=64, show_default=True)
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Prompts: one per line, or JSONL with \"prompt\".")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench"),
              show_default=True, help="Writes OUT.json and OUT.png (latency against load).")
@engine_options
@speculative_options
def bench(engine_dir, url, model, api_key, concurrency, rate, arrivals, num_requests,
          input_tokens, output_tokens, prompts_file, seed, out, **engine_kw) -> None:
    """Load-test ENGINE_DIR in this process, or a server with --url."""
    from llm_engine.runtime.bench import (
        LoadSpec,
        engine_sender,
        file_prompts,
        http_sender,
        plot,
        speculation_probe,
        sweep,
        synthetic_prompts,
    )

    if (engine_dir is None) == (url is None):
        _fail("give ENGINE_DIR or --url (one of them)")
    if concurrency and rate:
        _fail("--concurrency and --rate are alternatives; pass one")
    if any(c < 1 for c in concurrency) or any(r <= 0 for r in rate):
        _fail("--concurrency must be >= 1 and --rate > 0")
    if output_tokens < 1 or input_tokens < 1:
        _fail("--input-tokens and --output-tokens must be >= 1")
    spec_flags = ("speculative", "num_speculative_tokens", "draft_engine", "ngram_min",
                  "ngram_max")
    if url is not None and any(engine_kw[k] is not None for k in spec_flags):
        _fail("--speculative and its options are for ENGINE_DIR; a server --url speculates "
              "as it was started")
    levels = []
    for c in concurrency or (() if rate else (1, 8, 32, 64)):
        levels.append(LoadSpec(num_requests or max(8, 2 * c), concurrency=c, seed=seed))
    for r in rate:
        levels.append(LoadSpec(num_requests or 32, rate=r, poisson=arrivals == "poisson",
                               seed=seed))
    most = max(spec.num_requests for spec in levels)
    try:
        prompts = file_prompts(prompts_file, most) if prompts_file else \
            synthetic_prompts(most, input_tokens, seed)
    except (OSError, ValueError) as e:
        _fail(str(e))
    async_engine = probe = None
    if url is not None:
        send = http_sender(url, model, output_tokens, api_key)
        target = url
    else:
        from llm_engine.runtime.async_engine import AsyncEngine

        engine_kw["max_num_seqs"] = max(engine_kw["max_num_seqs"],
                                        max(s.concurrency or 0 for s in levels))
        async_engine = AsyncEngine(load_engine(engine_dir, **engine_kw), owns_engine=True)
        send = engine_sender(async_engine, output_tokens)
        probe = speculation_probe(async_engine.engine)
        target = str(engine_dir)
    try:
        rows = asyncio.run(sweep(send, prompts, levels, _progress, probe))
    finally:
        if async_engine is not None:
            async_engine.shutdown()
    report = {"target": target, "input_tokens": None if prompts_file else input_tokens,
              "prompts_file": str(prompts_file) if prompts_file else None,
              "output_tokens": output_tokens, "levels": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    drew = plot(rows, out.with_suffix(".png"), f"engine bench: {target}")
    _print_table(rows)
    click.echo(f"wrote {json_path}" + (f" and {out.with_suffix('.png')}" if drew else ""),
               err=True)


def _pair(r: dict[str, Any], name: str) -> str:
    a, b = r[f"{name}_p50_ms"], r[f"{name}_p99_ms"]
    return "–" if a is None else f"{a:.0f} / {b:.0f}"


def _print_table(rows: list[dict[str, Any]]) -> None:
    """The levels as a Markdown table; with speculation, its acceptance per level too."""
    spec = any("speculative" in r for r in rows)
    click.echo("| load | req/s | out tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | "
               "ITL p50/p99 ms | e2e p50/p99 ms | errors |"
               + (" spec accepted | tok/step |" if spec else ""))
    click.echo("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if spec else ""))
    for r in rows:
        load = f"c={r['load']['concurrency']}" if "concurrency" in r["load"] else \
            f"{r['load']['rate']}/s"
        line = (f"| {load} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                f"{_pair(r, 'ttft')} | {_pair(r, 'tpot')} | {_pair(r, 'itl')} | "
                f"{_pair(r, 'e2e')} | {r['errors']} |")
        if spec:
            s = r.get("speculative") or {}
            line += (f" {s.get('acceptance_rate', 0):.0%} | "
                     f"{s.get('mean_accepted_length', 0):.2f} |")
        click.echo(line)
