"""Tool calling through `engine serve`'s /v1/chat/completions on the tiny llama engine (random
weights, a ChatML template without tool markers, so the server runs with the hermes parser, or
mistral's): tool_choice "required" and a named function force a call that parses and validates
against the function's schema even from a random model, whole and streamed; "none" is plain
content; bad tool fields are 400s naming the field; a conversation with assistant tool_calls
and a tool message renders and answers; parallel_tool_calls false gives at most one call, whole
and streamed, also when the model writes two (forced here with structured_outputs); and the
official openai client does the whole round trip."""

from __future__ import annotations

import json

import httpx2 as httpx
import jsonschema
import openai
import pytest

from tests.server_harness import serve

MAX_TOKENS = 300
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8},
                   "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["utc", "cet"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def live(engines):
    yield from serve(engines, max_n=4, tool_call_parser="hermes")


@pytest.fixture(scope="module")
def live_mistral(engines):
    """--tool-call-parser mistral; its markers are text in the tiny tokenizer."""
    yield from serve(engines, tool_call_parser="mistral")


@pytest.fixture(scope="module")
def live_detect(engines):
    """No --tool-call-parser: the tiny engine's template has no tool markers."""
    yield from serve(engines)


def _post(live, body: dict) -> httpx.Response:
    return httpx.post(live.url + "/v1/chat/completions",
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": MAX_TOKENS,
                            **body}, timeout=120)


def _ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text[:500]
    return r.json()


def _check_call(call: dict, names=tuple(SCHEMAS)) -> None:
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    name = call["function"]["name"]
    assert name in names
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


@pytest.mark.parametrize("seed", [1, 2])
def test_required_forces_a_valid_call(live, seed):
    out = _ok(_post(live, {"tools": TOOLS, "tool_choice": "required",
                           "parallel_tool_calls": False, "temperature": 1.0, "seed": seed}))
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"]["tool_calls"]
    assert len(calls) == 1
    _check_call(calls[0])
    assert choice["message"]["content"] is None


def test_named_function(live):
    choice = {"type": "function", "function": {"name": "get_time"}}
    out = _ok(_post(live, {"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False,
                           "temperature": 1.0, "seed": 5, "n": 2}))
    for c in out["choices"]:
        assert c["finish_reason"] == "tool_calls", c
        (call,) = c["message"]["tool_calls"]
        _check_call(call, names=("get_time",))


def test_parallel_calls_allowed(live):
    out = _ok(_post(live, {"tools": TOOLS, "tool_choice": "required", "temperature": 1.0,
                           "seed": 7, "max_tokens": 400}))
    choice = out["choices"][0]
    # the grammar may continue with more calls; a reply cut by max_tokens keeps its whole ones
    assert choice["finish_reason"] in ("tool_calls", "length"), choice
    calls = choice["message"].get("tool_calls") or []
    if choice["finish_reason"] == "tool_calls":
        assert calls
    for call in calls:
        _check_call(call)
    assert len({c["id"] for c in calls}) == len(calls)


def test_none_returns_plain_content(live):
    out = _ok(_post(live, {"tools": TOOLS, "tool_choice": "none", "temperature": 0,
                           "max_tokens": 8}))
    choice = out["choices"][0]
    assert "tool_calls" not in choice["message"]
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("body, param, words", [
    ({"tools": "x"}, "tools", "tools must be a list"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools",
     "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "non-empty tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice", "response_format"),
])
def test_bad_tool_fields_are_400s(live, body, param, words):
    r = _post(live, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert words in err["message"]


def test_no_parser_is_a_400(live_detect):
    r = _post(live_detect, {"tools": TOOLS})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "tools"
    assert "no tool-call format" in err["message"] and "--tool-call-parser" in err["message"]
    # without tools, or with tool_choice "none" (nothing to parse), it still answers
    assert _post(live_detect, {"max_tokens": 2}).status_code == 200
    assert _post(live_detect, {"tools": TOOLS, "tool_choice": "none",
                               "max_tokens": 2}).status_code == 200


def test_bad_tool_calls_message_is_a_400(live):
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": "x"}]
    r = _post(live, {"messages": messages, "tools": TOOLS})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"


def _stream(live, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", live.url + "/v1/chat/completions",
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": MAX_TOKENS,
                            "stream": True, **body}, timeout=120) as r:
        assert r.status_code == 200, r.read()[:500]
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def test_streaming_reassembles_the_same_call(live):
    body = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
            "temperature": 1.0, "seed": 11}
    whole = _ok(_post(live, body))["choices"][0]
    chunks = _stream(live, body)
    calls: dict[int, dict] = {}
    content = ""
    finish = None
    for chunk in chunks:
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        content += delta.get("content") or ""
        for d in delta.get("tool_calls") or []:
            if "id" in d:  # the first delta of a call: id, type and name
                assert d["index"] not in calls and d["type"] == "function"
                calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"],
                                     "arguments": d["function"].get("arguments", "")}
            else:
                assert "name" not in d["function"]
                calls[d["index"]]["arguments"] += d["function"].get("arguments", "")
        finish = choice["finish_reason"] or finish
    assert finish == "tool_calls"
    assert content.strip() == ""
    (call,) = calls.values()
    (expect,) = whole["message"]["tool_calls"]
    assert call["name"] == expect["function"]["name"]
    assert json.loads(call["arguments"]) == json.loads(expect["function"]["arguments"])
    _check_call({"id": call["id"], "type": "function",
                 "function": {"name": call["name"], "arguments": call["arguments"]}})


def test_round_trip_conversation(live):
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather",
                          "arguments": json.dumps({"city": "Paris", "unit": "c"})}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees, sunny"},
    ]
    out = _ok(_post(live, {"messages": messages, "tools": TOOLS, "max_tokens": 8,
                           "temperature": 0}))
    assert out["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    # the template rendered the whole conversation: the tool turn is in the prompt
    first = _ok(_post(live, {"tools": TOOLS, "max_tokens": 1, "temperature": 0}))
    assert out["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 5


HERMES_TWO = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
              '\n</tool_call>')
MISTRAL_TWO = ('[TOOL_CALLS]get_time[ARGS]{"zone": "utc"}'
               '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}')


def _two_calls(text: str, parallel: bool, **extra) -> dict:
    """A request whose reply is `text` (two calls), forced with structured_outputs: a random
    model would not write calls under tool_choice "auto"."""
    return {"tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": parallel,
            "structured_outputs": {"choice": [text]}, "temperature": 1.0, "seed": 1, **extra}


def _streamed_calls(client: openai.OpenAI, body: dict) -> tuple[list[dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    extra = {k: body.pop(k) for k in ("structured_outputs",) if k in body}
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True,
                                                max_tokens=MAX_TOKENS, extra_body=extra,
                                                **body):
        for d in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"name": d.function.name, "arguments": ""})
            call["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("fixture, text", [("live", HERMES_TWO), ("live_mistral", MISTRAL_TWO)])
def test_parallel_tool_calls_false_gives_one_call(request, fixture, text):
    """The model writes two calls; without parallel_tool_calls the response holds the first
    only, and no delta of a second call is streamed."""
    srv = request.getfixturevalue(fixture)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    both = _ok(_post(srv, _two_calls(text, True)))["choices"][0]
    assert [c["function"]["name"] for c in both["message"]["tool_calls"]] == \
        ["get_time", "get_weather"]
    body = _two_calls(text, False)
    extra = {"structured_outputs": body.pop("structured_outputs")}
    one = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                         extra_body=extra, **body).choices[0]
    assert one.finish_reason == "tool_calls"
    (call,) = one.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time",
                                                                         {"zone": "utc"})
    streamed, finish = _streamed_calls(client, _two_calls(text, False))
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == \
        [("get_time", {"zone": "utc"})]


def test_parallel_tool_calls_false_stops_hermes_at_the_first_call(live):
    """Hermes has an end marker: generation stops there instead of writing the second call."""
    both = _ok(_post(live, _two_calls(HERMES_TWO, True)))
    one = _ok(_post(live, _two_calls(HERMES_TWO, False)))
    assert one["choices"][0]["finish_reason"] == "tool_calls"
    assert one["usage"]["completion_tokens"] < both["usage"]["completion_tokens"] / 2 + 5


def test_mistral_forced_call_one_and_parallel(live_mistral):
    for parallel in (False, True):
        out = _ok(_post(live_mistral, {"tools": TOOLS, "tool_choice": "required",
                                       "parallel_tool_calls": parallel, "temperature": 1.0,
                                       "seed": 4}))
        choice = out["choices"][0]
        assert choice["finish_reason"] in ("tool_calls", "length"), choice
        calls = choice["message"].get("tool_calls") or []
        assert len(calls) == 1 if not parallel else len(calls) >= (
            choice["finish_reason"] == "tool_calls")
        for call in calls:
            _check_call(call)


def test_special_markers_are_kept():
    """Markers that are special tokens are found (decoded with special tokens kept, matched
    as tokens by the grammar); plain-text ones are not."""
    from llm_engine.runtime.server import _special_markers

    class Backend:
        def token_to_id(self, text):
            return {"[TOOL_CALLS]": 5, "<tool_call>": 6}.get(text)

    class Tok:
        backend = Backend()
        skipped_ids = frozenset({5})

    assert _special_markers(Tok()) == {"[TOOL_CALLS]": 5}
    assert _special_markers(None) == {}


def test_marker_tokens_include_added_tokens_that_are_not_special():
    """The grammar names every marker that is an added token (Qwen's <tool_call> is not
    special), since llguidance treats all added tokens as special."""
    from llm_engine.runtime.server import _marker_tokens

    class Backend:
        def token_to_id(self, text):
            return {"[TOOL_CALLS]": 5, "<tool_call>": 6, "[ARGS]": 7}.get(text)

        def get_added_tokens_decoder(self):
            return {5: "[TOOL_CALLS]", 6: "<tool_call>"}  # [ARGS]: an ordinary vocab entry

    class Tok:
        backend = Backend()
        skipped_ids = frozenset({5})

    assert _marker_tokens(Tok()) == {"[TOOL_CALLS]": 5, "<tool_call>": 6}
    assert _marker_tokens(None) == {}


def test_serve_has_the_option():
    from click.testing import CliRunner

    from llm_engine.builder.cli import main

    out = CliRunner().invoke(main, ["serve", "--help"])
    assert out.exit_code == 0 and "--tool-call-parser" in out.output


def test_openai_client_flow(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=1.0, seed=3)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    messages = [*MESSAGES, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True})}]
    follow = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                            tool_choice="none", max_tokens=8, temperature=0)
    assert follow.choices[0].message.tool_calls is None
    assert isinstance(follow.choices[0].message.content, str)

    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=1.0, seed=3, stream=True)
    name, arguments, finish = None, "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for d in delta.tool_calls or []:
            name = name or d.function.name
            arguments += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert name == call.function.name
    assert json.loads(arguments) == args
