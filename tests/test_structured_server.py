"""Structured outputs through `engine serve` and `engine run --json-schema`, on the tiny llama
engine (random weights, a real tokenizer): OpenAI's `response_format` and vLLM's
`structured_outputs` on chat and completions, whole and streamed, through raw HTTP and the
official openai client; what the grammar guarantees (the text parses and validates) holds even
though the model is random. Bad specs and grammars that fail to compile are 400s."""

from __future__ import annotations

import json
import re

import httpx2 as httpx
import jsonschema
import openai
import pytest
from click.testing import CliRunner

from llm_engine.builder.cli import main
from tests.cli_util import one_line_error
from tests.server_harness import serve

MAX_TOKENS = 200
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6},
                   "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def live(engines):
    yield from serve(engines, max_n=4)


def _post(live, route: str, body: dict) -> httpx.Response:
    return httpx.post(live.url + route, json={"model": "tiny", **body}, timeout=120)


def _body(chat: bool, **extra) -> tuple[str, dict]:
    if chat:
        return "/v1/chat/completions", {"messages": MESSAGES, **extra}
    return "/v1/completions", {"prompt": "A person as JSON:", **extra}


def _text(choice: dict) -> str:
    return choice["message"]["content"] if "message" in choice else choice["text"]


def _check_json(text: str, finish_reason: str, schema: dict | None) -> None:
    assert finish_reason in ("stop", "length"), finish_reason
    if finish_reason == "length":  # the grammar held, but the output was cut short
        return
    value = json.loads(text)
    if schema is None:
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, schema)


def _ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text[:500]
    return r.json()


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_response_format_json_schema(live, chat):
    route, body = _body(chat, response_format=JSON_SCHEMA, max_tokens=MAX_TOKENS,
                        temperature=1.0, seed=3, n=2)
    out = _ok(_post(live, route, body))
    reasons = [c["finish_reason"] for c in out["choices"]]
    for c in out["choices"]:
        _check_json(_text(c), c["finish_reason"], PERSON)
    assert "stop" in reasons, reasons  # small schema: at least one finishes


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_json_object(live, chat):
    route, body = _body(chat, response_format={"type": "json_object"}, max_tokens=MAX_TOKENS,
                        temperature=0)
    c = _ok(_post(live, route, body))["choices"][0]
    _check_json(_text(c), c["finish_reason"], None)
    if c["finish_reason"] == "length":  # cut short, but what there is opens an object
        assert _text(c).lstrip().startswith("{")


def test_structured_outputs_regex_and_choice(live):
    route, body = _body(False, structured_outputs={"regex": r"[0-9]{3}-[a-z]{2}"},
                        max_tokens=20, temperature=1.0, seed=1)
    c = _ok(_post(live, route, body))["choices"][0]
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", c["text"]) and c["finish_reason"] == "stop"
    choices = ["red", "green", "blue"]
    route, body = _body(True, structured_outputs={"choice": choices}, max_tokens=20,
                        temperature=1.0, seed=2, n=3)
    for c in _ok(_post(live, route, body))["choices"]:
        assert c["message"]["content"] in choices and c["finish_reason"] == "stop"


def test_response_format_text_is_unconstrained(live):
    route, body = _body(False, response_format={"type": "text"}, max_tokens=4,
                        temperature=0)
    c = _ok(_post(live, route, body))["choices"][0]
    assert c["finish_reason"] == "length"  # the tiny model never ends on its own


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_streamed_deltas_parse(live, chat):
    route, body = _body(chat, response_format=JSON_SCHEMA, max_tokens=MAX_TOKENS,
                        temperature=0, stream=True)
    with httpx.stream("POST", live.url + route, json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    text = "".join((c["choices"][0].get("delta", {}).get("content") or "") if chat
                   else c["choices"][0]["text"] for c in chunks)
    assert len(chunks) > 3  # token by token, not one piece
    _check_json(text, chunks[-1]["choices"][0]["finish_reason"], PERSON)


def test_openai_client(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "x", "schema": PERSON}})
    c = r.choices[0]
    _check_json(c.message.content, c.finish_reason, PERSON)
    with pytest.raises(openai.BadRequestError, match="not a JSON type"):
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=4,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "person"}}})


BAD = {
    "both": ({"response_format": {"type": "json_object"},
              "structured_outputs": {"regex": "a+"}}, "structured_outputs", "not both"),
    "bad-type": ({"response_format": {"type": "xml"}}, "response_format", "'xml'"),
    "not-an-object": ({"response_format": "json"}, "response_format", "must be an object"),
    "no-schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                  "response_format", "schema is missing"),
    "bad-schema": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"maxLength": -1}}}}}},
        "response_format", "#/properties/a/maxLength"),
    "two-kinds": ({"structured_outputs": {"regex": "a", "choice": ["b"]}},
                  "structured_outputs", "exactly one"),
    "unknown-kind": ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs", "xml"),
    "empty-choice": ({"structured_outputs": {"choice": []}}, "structured_outputs",
                     "at least one"),
}


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_spec_is_a_400(live, chat, name):
    extra, param, fragment = BAD[name]
    route, body = _body(chat, max_tokens=4, **extra)
    r = _post(live, route, body)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("spec, fragment", [
    ({"regex": "[a-"}, "unclosed character class"),
    ({"grammar": "start: undefined_rule"}, "undefined_rule"),
    ({"json": {"properties": {"a": {"$ref": "#/$defs/missing"}}}}, "/$defs/missing"),
], ids=["regex", "grammar", "json-ref"])
def test_compile_error_is_a_400(live, spec, fragment, stream):
    route, body = _body(True, structured_outputs=spec, max_tokens=8, stream=stream)
    r = _post(live, route, body)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["message"].startswith("structured output:"), error
    assert fragment in error["message"], error
    ok = _post(live, *_body(False, max_tokens=2))  # the server keeps answering
    assert ok.status_code == 200


# ---- engine run --json-schema -----------------------------------------------------------------

KV = ["--kv-cache-memory", "4MiB"]


def _run(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


def test_run_json_schema(engines, tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    result = _run(engines("llama"), "--prompt", "A person:", "-p", "Another:", "--json",
                  "--json-schema", schema, "--max-tokens", MAX_TOKENS, "--seed", "5", *KV)
    assert result.exit_code == 0, result.output
    outs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(outs) == 2
    for out in outs:
        _check_json(out["text"], out["finish_reason"], PERSON)
    assert "stop" in [o["finish_reason"] for o in outs]


def test_run_json_schema_errors(engines, tmp_path):
    engine_dir = engines("llama")
    ok = ["--prompt", "hi", *KV]
    one_line_error(_run(engine_dir, *ok, "--json-schema", tmp_path / "missing.json"),
                   "--json-schema", "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_line_error(_run(engine_dir, *ok, "--json-schema", bad), "bad.json", "not valid JSON")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"type": "object", "minItems": 3, "maxItems": 1}))
    one_line_error(_run(engine_dir, *ok, "--json-schema", wrong), "wrong.json",
                   "minItems 3 > maxItems 1")
