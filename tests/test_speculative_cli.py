"""Speculative decoding from the interfaces: `engine run|serve|bench --speculative ...`, their
one-line errors, AsyncEngine.load's options, the /metrics series and bench's per-level stats.
Greedy decoding with speculation must give the text it gives without."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import httpx2 as httpx
import pytest
from click.testing import CliRunner

from llm_engine.builder.cli import main
from llm_engine.runtime import AsyncEngine, Engine, SamplingParams
from llm_engine.runtime.bench import speculation_probe
from llm_engine.runtime.server import ServerConfig
from llm_engine.runtime.server_metrics import ServerMetrics
from tests.cli_util import one_line_error
from tests.server_harness import LiveServer, metric

KV = ["--kv-cache-memory", "4MiB"]  # the default would reserve up to 2 GiB
# Repeats give prompt lookup something to draft from.
PROMPTS = ["one two three one two three one two", "Paris is"]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


@pytest.fixture(scope="module")
def engine_dir(engines) -> Path:
    return engines("llama")


@pytest.fixture(scope="module")
def reference(engine_dir) -> list:
    """The greedy outputs without speculation."""
    return Engine.load(engine_dir, kv_cache_memory=4 << 20).generate(PROMPTS, GREEDY)


def _cli(command: str, *args) -> object:
    return CliRunner().invoke(main, [command, *map(str, args)])


def _run_prompts(engine_dir: Path, *spec: str) -> object:
    prompts = [a for p in PROMPTS for a in ("-p", p)]
    return _cli("run", engine_dir, *prompts, "--max-tokens", "16", "--temperature", "0", *KV,
                *spec)


@pytest.mark.parametrize("spec,line", [
    (["--speculative", "ngram"], "Speculative: ngram, K=4 (adaptive)"),
    (["--speculative", "ngram", "--num-speculative-tokens", "2", "--ngram-min", "1"],
     "Speculative: ngram, K=2 (adaptive)"),
    (["--speculative", "draft", "--draft-engine", "SELF"], "Speculative: draft "),
])
def test_run_with_speculation_gives_the_greedy_text(engine_dir, reference, spec, line):
    # the engine drafting for itself: a draft that agrees with the target, in the tiniest way
    spec = [str(engine_dir) if a == "SELF" else a for a in spec]
    result = _run_prompts(engine_dir, *spec)
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(f"{r.text}\n[length]\n\n" for r in reference)
    assert line in result.stderr and "KV cache:" in result.stderr
    assert "drafted tokens accepted" in result.stderr  # the end-of-run line


def test_run_without_speculation_says_nothing_of_it(engine_dir, reference):
    result = _run_prompts(engine_dir)
    assert result.exit_code == 0, result.output
    assert "Speculative" not in result.stderr and "drafted" not in result.stderr


def _other_tokenizer(engine_dir: Path, out: Path) -> Path:
    """A copy of the engine whose tokenizer.json differs (its manifest updated to match)."""
    shutil.copytree(engine_dir, out)
    tok = out / "tokenizer" / "tokenizer.json"
    obj = json.loads(tok.read_text())
    obj["model"]["vocab"] = {k + "x" if v == 300 else k: v
                             for k, v in obj["model"]["vocab"].items()}
    tok.write_text(json.dumps(obj))
    meta = json.loads((out / "engine.json").read_text())
    data = tok.read_bytes()
    entry = meta["files"]["tokenizer/tokenizer.json"]
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (out / "engine.json").write_text(json.dumps(meta))
    return out


def test_bad_speculative_options_are_one_line(engine_dir, tmp_path):
    ok = [engine_dir, "--prompt", "hi", "--max-tokens", "2", *KV]
    for args, fragments in (
            (["--speculative", "draft"], ["--draft-engine"]),
            (["--speculative", "bogus"], ["'bogus'", "ngram, draft"]),
            (["--speculative", "ngram", "--num-speculative-tokens", "0"],
             ["--num-speculative-tokens", "got 0"]),
            (["--speculative", "ngram", "--num-speculative-tokens", "17"], ["[1, 16]"]),
            (["--num-speculative-tokens", "3"], ["needs --speculative"]),
            (["--speculative", "draft", "--draft-engine", tmp_path / "nope"],
             ["--draft-engine", "nope", "not an engine directory"]),
            (["--speculative", "ngram", "--draft-engine", engine_dir],
             ["--speculative draft"]),
            (["--speculative", "ngram", "--ngram-min", "5", "--ngram-max", "3"],
             ["--ngram-min", "--ngram-max"]),
            (["--speculative", "draft", "--draft-engine", engine_dir, "--ngram-max", "3"],
             ["--speculative ngram"])):
        one_line_error(_cli("run", *ok, *args), *fragments)
    other = _other_tokenizer(engine_dir, tmp_path / "other")
    one_line_error(_cli("run", *ok, "--speculative", "draft", "--draft-engine", other),
                   "draft engine", "tokenizer differs")
    # serve and bench check the same options before loading anything
    one_line_error(_cli("serve", engine_dir, "--speculative", "draft"), "--draft-engine")
    one_line_error(_cli("bench", engine_dir, "--num-speculative-tokens", "99",
                        "--speculative", "ngram"), "--num-speculative-tokens")
    one_line_error(_cli("bench", "--url", "http://127.0.0.1:9", "--speculative", "ngram"),
                   "ENGINE_DIR")


# ---- AsyncEngine and the server ---------------------------------------------------------------
@pytest.fixture(scope="module")
def spec_server(engine_dir):
    ae = AsyncEngine.load(engine_dir, speculative="ngram", num_speculative_tokens=3,
                          ngram_min=1, ngram_max=3, block_size=4, kv_cache_memory=4 << 20)
    srv = LiveServer(ae, ServerConfig(model_name="tiny"))
    yield srv
    srv.stop()
    ae.shutdown()


async def _collect(ae: AsyncEngine) -> list:
    async def one(prompt: str):
        async for out in ae.generate(prompt, GREEDY):
            last = out
        return last

    return await asyncio.gather(*(one(p) for p in PROMPTS))


def test_async_engine_load_takes_the_speculative_options(spec_server, reference):
    ae = spec_server.ae
    config = ae.engine.speculator.config
    assert (config.method, config.num_tokens, config.ngram_min, config.ngram_max) == \
        ("ngram", 3, 1, 3)
    outs = asyncio.run(_collect(ae))
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
    assert all("spec_proposed_tokens" in o.metrics for o in outs)


def test_metrics_have_the_speculation_series(spec_server, reference):
    body = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    reply = httpx.post(spec_server.url + "/v1/completions", json=body).json()
    assert reply["choices"][0]["text"] == reference[0].text
    text = httpx.get(spec_server.url + "/metrics").text
    stats = spec_server.ae.engine.speculator.stats
    assert stats.proposed > 0  # prompt lookup found the repeats
    assert metric(text, "llm_engine_spec_proposed_tokens_total") == stats.proposed
    assert metric(text, "llm_engine_spec_accepted_tokens_total") == stats.accepted
    assert metric(text, "llm_engine_spec_acceptance_rate") == \
        pytest.approx(stats.acceptance_rate)
    assert metric(text, "llm_engine_spec_mean_accepted_length") >= 1


def test_no_speculation_series_when_off(engine_dir):
    engine = Engine.load(engine_dir, kv_cache_memory=4 << 20)
    assert b"llm_engine_spec_" not in ServerMetrics(engine).render()
    assert speculation_probe(engine) is None


# ---- bench ------------------------------------------------------------------------------------
def test_bench_reports_speculation_per_level(engine_dir, tmp_path):
    out = tmp_path / "b"
    result = _cli("bench", engine_dir, "-c", "1", "-c", "2", "-n", "2", "--input-tokens", "8",
                  "--output-tokens", "12", "--out", out, *KV, "--block-size", "4",
                  "--speculative", "ngram", "--ngram-min", "1")
    assert result.exit_code == 0, result.output
    levels = json.loads(out.with_suffix(".json").read_text())["levels"]
    total = 0
    for level in levels:
        assert level["completed"] == 2 and level["errors"] == 0
        spec = level["speculative"]
        assert set(spec) == {"proposed", "accepted", "steps", "acceptance_rate",
                             "mean_accepted_length", "skipped_steps", "grammar_cut"}
        assert 0 <= spec["accepted"] <= spec["proposed"]
        total += spec["proposed"]
    assert total > 0  # a one-token match always finds something in 8 random common words
    assert "spec accepted" in result.stdout and "Speculative: ngram" in result.stderr
