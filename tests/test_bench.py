"""`engine bench`: the load generator's concurrency and arrival schedule, the statistics, and
the command on a tiny engine (in-process; the --url path is tested against the live server
in tests/test_server.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner

from llm_engine.builder.cli import main
from llm_engine.runtime.bench import LoadSpec, Result, _pct, run_load, summarize, synthetic_prompts
from tests.cli_util import one_line_error


def _fake_send(delay: float, state: dict, fail_on: str | None = None):
    async def send(prompt: str, t0: float, r: Result) -> None:
        state["now"] = state.get("now", 0) + 1
        state["peak"] = max(state.get("peak", 0), state["now"])
        try:
            await asyncio.sleep(delay)
            if prompt == fail_on:
                raise ConnectionError("refused")
            r.ttft, r.e2e, r.output_tokens, r.prompt_tokens = delay / 2, delay, 5, 3
        finally:
            state["now"] -= 1

    return send


def test_fixed_concurrency_is_never_exceeded_and_every_request_runs():
    state: dict = {}
    prompts = synthetic_prompts(20, 4)
    results, wall = asyncio.run(run_load(prompts, LoadSpec(20, concurrency=3),
                                         _fake_send(0.01, state)))
    assert state["peak"] == 3 and all(r.ok for r in results) and len(results) == 20
    assert wall >= 0.01 * 20 / 3


def test_rate_schedule_and_failures_are_counted():
    state: dict = {}
    prompts = ["a", "b", "c", "boom", "d", "e"]
    results, wall = asyncio.run(run_load(prompts, LoadSpec(6, rate=50, poisson=False),
                                         _fake_send(0.05, state, fail_on="boom")))
    starts = [r.start for r in results]
    assert starts == sorted(starts) and starts[-1] >= 5 / 50 * 0.9  # evenly spaced at 50/s
    assert state["peak"] >= 2  # arrivals do not wait for earlier requests to finish
    stats = summarize(results, wall)
    assert stats["completed"] == 5 and stats["errors"] == 1
    assert "ConnectionError: refused" in stats["error_examples"][0]
    assert stats["output_tokens"] == 25


def test_percentiles():
    assert _pct([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert _pct(list(map(float, range(101))), 0.99) == pytest.approx(99.0)
    assert _pct([], 0.5) is None


def test_bench_command_on_an_engine(engines, tmp_path):
    out = tmp_path / "b"
    result = CliRunner().invoke(main, [
        "bench", str(engines("llama")), "-c", "1", "-c", "3", "-n", "4", "--input-tokens", "6",
        "--output-tokens", "5", "--out", str(out), "--kv-cache-memory", "4MiB",
        "--block-size", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert [lvl["load"]["concurrency"] for lvl in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["completed"] == 4 and level["errors"] == 0
        assert level["output_tokens"] == 4 * 5  # ignore_eos: every request makes all tokens
        # A stream may deliver a tiny engine's tokens in one chunk (e2e == ttft): TPOT is
        # then 0, not missing.
        assert level["ttft_p50_ms"] > 0 and level["tpot_p50_ms"] >= 0
        assert level["e2e_p50_ms"] >= level["ttft_p50_ms"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| c=3 |" in result.stdout


@pytest.mark.parametrize("args,fragment", [
    ([], "give ENGINE_DIR or --url"),
    (["--url", "http://127.0.0.1:9", "x"], "give ENGINE_DIR or --url"),
    (["x", "-c", "2", "--rate", "1"], "alternatives"),
    (["x", "-c", "0"], "--concurrency must be >= 1"),
])
def test_bench_bad_options(args, fragment):
    one_line_error(CliRunner().invoke(main, ["bench", *args]), fragment)


def test_unreachable_server_counts_errors(tmp_path):
    out = tmp_path / "u"
    result = CliRunner().invoke(main, ["bench", "--url", "http://127.0.0.1:9", "-c", "2",
                                       "-n", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    level = json.loads(out.with_suffix(".json").read_text())["levels"][0]
    assert level["completed"] == 0 and level["errors"] == 3
    assert "ConnectionRefusedError" in level["error_examples"][0]
