"""Structured outputs through the engine: every constrained output parses and validates, a
compiling grammar holds up no one, a bad one ends its request with the compiler's message,
and constrained requests survive preemption, prefix caching and speculation."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from llm_engine.runtime import Engine, SamplingParams
from tests.structured_schemas import CASES

SMALL = dict(block_size=4, kv_cache_memory=8 << 20)
# Small enough that a random tiny model's output completes within the token budget.
BOUNDED = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6},
                   "n": {"type": "integer", "minimum": -5, "maximum": 5},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                   "ok": {"type": "boolean"}},
    "required": ["name", "n", "tags", "ok"], "additionalProperties": False,
}


def _check(out, schema) -> None:
    if out.finish_reason == "length":  # the budget ran out first, as OpenAI reports it
        return
    assert out.finish_reason == "stop", (out.finish_reason, out.error)
    jsonschema.validate(json.loads(out.text), schema)


@pytest.fixture(scope="module")
def tiny(engines):
    return engines("llama")  # has a tokenizer


def test_json_schema_outputs_validate_greedy_and_sampled(tiny):
    eng = Engine.load(tiny, **SMALL)
    params = [SamplingParams(temperature=t, seed=s, max_tokens=160, structured={"json": BOUNDED})
              for t, s in ((0, None), (0.9, 1), (1.2, 2), (0.7, 3))]
    outs = eng.generate(["Describe:"] * len(params), params)
    assert sum(o.finish_reason == "stop" for o in outs) >= 3
    for out in outs:
        _check(out, BOUNDED)


def test_regex_choice_and_json_object(tiny):
    eng = Engine.load(tiny, **SMALL)
    outs = eng.generate(["x"] * 3, [
        SamplingParams(temperature=0, max_tokens=20, structured={"regex": r"[0-9]{3}-[ab]{2}"}),
        SamplingParams(temperature=0.8, seed=4, max_tokens=20,
                       structured={"choice": ["red", "green", "blue"]}),
        SamplingParams(temperature=0, max_tokens=200, structured={"json_object": True})])
    import re

    assert re.fullmatch(r"[0-9]{3}-[ab]{2}", outs[0].text)
    assert outs[1].text in ("red", "green", "blue")
    if outs[2].finish_reason == "stop":
        assert isinstance(json.loads(outs[2].text), dict)


def test_unconstrained_rows_are_untouched(tiny):
    """A constrained request beside plain ones: the plain ones decode as alone."""
    eng = Engine.load(tiny, **SMALL)
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = eng.generate(["Hello there", "abc"], plain)
    mixed = eng.generate(["Hello there", "Describe:", "abc"],
                         [plain, SamplingParams(temperature=0, max_tokens=60,
                                                structured={"json": BOUNDED}), plain])
    assert [mixed[0].token_ids, mixed[2].token_ids] == [o.token_ids for o in alone]


def test_a_bad_grammar_ends_only_its_request(tiny):
    eng = Engine.load(tiny, **SMALL)
    outs = eng.generate(["x", "y"], [
        SamplingParams(temperature=0, max_tokens=8, structured={"grammar": "start: @@@"}),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)])
    assert outs[0].finish_reason == "error" and "structured output" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 8


def test_an_invalid_spec_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="regex"):
        SamplingParams(structured={"regex": 5})
    with pytest.raises(ValueError):
        SamplingParams(structured={"json": {"type": "no-such-type"}})


def test_a_compiling_grammar_holds_up_no_one(tiny, monkeypatch):
    """While a request's grammar compiles on its worker, other requests keep decoding."""
    from llm_engine.runtime.structured.compiler import compile_spec as real

    gate = threading.Event()

    def slow(spec, tok):
        gate.wait(30)
        return real(spec, tok)

    eng = Engine.load(tiny, **SMALL)
    eng.add_request("warm", SamplingParams(temperature=0, max_tokens=2,
                                           structured={"choice": ["a"]}))
    while eng.has_unfinished():
        eng.step()
    monkeypatch.setattr(eng._grammars, "_compile", slow)
    slow_id = eng.add_request("x", SamplingParams(temperature=0, max_tokens=4,
                                                  structured={"regex": "[a-c]{4}"}))
    fast_id = eng.add_request("y", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    done = {}
    for _ in range(50):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        if fast_id in done:
            break
    assert fast_id in done and slow_id not in done
    gate.set()
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert len(done[slow_id].text) == 4


def test_constrained_requests_with_preemption_prefix_cache_and_speculation(tiny):
    """A cache too small for all of them (preemption), shared prompts (prefix hits) and
    speculation on: every constrained output still validates."""
    import json as _json

    from llm_engine.runtime.executor import KVCacheSpec

    layers = _json.loads((tiny / "engine.json").read_text())["kv_cache"]["layers"]
    eng = Engine.load(tiny, block_size=4, speculative="ngram", num_speculative_tokens=3,
                      speculative_adaptive=False,
                      kv_cache_memory=40 * KVCacheSpec.bytes_per_block(layers, 4))
    prompt = "The same long shared prompt for every request: describe it."
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=120,
                             structured={"json": BOUNDED}) for i in range(6)]
    params += [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 2
    outs = eng.generate([prompt] * len(params), params)
    assert eng.scheduler.num_preemptions > 0
    for out in outs[:6]:
        _check(out, BOUNDED)
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


@pytest.mark.slow
def test_smollm2_json_schema_outputs_always_validate(tmp_path_factory):
    """SmolLM2 on the shared schemas (nested objects, arrays, enums, bounded numbers,
    optional fields, $refs, patterns): at least 20 finish, and 100% of finished outputs parse
    and validate."""
    from llm_engine.builder.build import BuildOptions, build_engine

    path = build_engine(BuildOptions(model="smollm2",
                                     output=tmp_path_factory.mktemp("smol") / "e"))
    eng = Engine.load(path, kv_cache_memory=256 << 20)
    prompts, params = [], []
    for case in CASES:
        prompts.append(eng.apply_chat_template(
            [{"role": "user", "content": f"Give a JSON example for the schema "
              f"{json.dumps(case.schema)}"}], add_generation_prompt=True))
        params.append(SamplingParams(temperature=0, max_tokens=400,
                                     structured={"json": case.schema}))
    outs = eng.generate(prompts, params)
    assert len(CASES) >= 20
    finished = [(o, c) for o, c in zip(outs, CASES, strict=True) if o.finish_reason == "stop"]
    # A few schemas let greedy decoding loop inside a long string until max_tokens (22 of 25
    # finish here); every finished output must validate.
    assert len(finished) >= 20
    for out, case in finished:
        jsonschema.validate(json.loads(out.text), case.schema)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculation_checks_drafts_against_the_grammar(tiny, method):
    """Constrained requests speculate: drafts are cut where the grammar forbids them and the
    rest are verified against the mask after each draft, so greedy output is token-exact with
    plain constrained decoding, drafts are kept, and sampled outputs still validate. The
    draft engine (the target itself) drafts under a copy of each request's grammar: it never
    guesses a token the grammar forbids, and its greedy guesses are the target's."""
    prompt = 'Fill {"name": "abc", "n": 1, "tags": ["a", "b"], "ok": true} again: '
    greedy = SamplingParams(temperature=0, max_tokens=80, structured={"json": BOUNDED})
    plain = Engine.load(tiny, **SMALL).generate([prompt], greedy)[0]
    extra = {"draft_engine": tiny} if method == "draft" else {}
    eng = Engine.load(tiny, **SMALL, speculative=method, num_speculative_tokens=3,
                      speculative_adaptive=False, **extra)
    sampled = [SamplingParams(temperature=0.9, seed=s, max_tokens=120,
                              structured={"json": BOUNDED}) for s in range(3)]
    outs = eng.generate([prompt] * 4, [greedy, *sampled])
    assert outs[0].token_ids == plain.token_ids and outs[0].finish_reason == plain.finish_reason
    for out in outs:
        _check(out, BOUNDED)
    stats = eng.speculator.stats
    assert stats.proposed > 0 and stats.accepted > 0, stats
    if method == "draft":
        assert stats.grammar_cut == 0, stats
        eng.speculator.stats = type(stats)()
        again = eng.generate([prompt], greedy)[0]
        assert again.token_ids == plain.token_ids
        greedy_stats = eng.speculator.stats
        assert greedy_stats.accepted >= 0.9 * greedy_stats.proposed > 0, greedy_stats


def test_structured_benchmark_quick(tiny, tmp_path):
    """benchmarks/structured.py end to end on the tiny engine: both overhead rows, and the
    speculation row's outputs token-identical with and without prompt lookup."""
    from tests.scripts import load_script

    bench = load_script("benchmarks/structured.py")
    out = tmp_path / "structured.json"
    payload = bench.main(["--engine", str(tiny), "--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    assert [r["batch"] for r in payload["rows"]] == [1, 4]
    for row in payload["rows"]:
        assert row["plain_tok_s"] > 0 and row["json_schema_tok_s"] > 0
    spec = payload["speculative"]
    assert spec["identical"] is True and spec["plain_tok_s"] > 0 and spec["ngram_tok_s"] > 0
    assert payload["machine"]["simd_flags"] is not None
