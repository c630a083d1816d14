"""runtime/tool_calls/: validation, template inputs, parsers (whole and streaming; both
Mistral formats; at most one call for parallel_tool_calls false), format detection and the
constrained grammar (decoded with random logits on SmolLM2's tokenizer). The real models'
templates and special tokens are in test_tool_calls_templates.py."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from llm_engine.runtime.tool_calls import (
    MAX_TOOLS,
    ToolCall,
    chat_template_inputs,
    constrained_grammar,
    detect_mistral_style,
    detect_parser,
    parse_tool_calls,
    single_call_stop,
    streaming_parser,
    validate_tools,
)
from tests.test_structured import decode as decode_masked
from tests.test_structured import tokenizer_json  # noqa: F401  (a fixture tok uses)

ROOT = Path(__file__).resolve().parent.parent

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}},
    "required": ["tz"], "additionalProperties": False}}}


def calls(result):
    content, cs = result
    return content, [(c.name, json.loads(c.arguments)) for c in cs]


# ------------------------------------------------------------------------------ validation


def test_validate_defaults_and_choices():
    cfg = validate_tools([WEATHER])
    assert cfg.tool_choice == "auto" and cfg.parallel_tool_calls and cfg.parse_calls
    assert not cfg.constrained and cfg.names == ("get_weather",)
    assert validate_tools(None).tool_choice == "none"
    named = validate_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}},
                           False)
    assert named.tool_choice == "function" and named.function_name == "get_time"
    assert [t["function"]["name"] for t in named.forced_tools()] == ["get_time"]
    assert not named.parallel_tool_calls and named.constrained
    bare = validate_tools([{"type": "function", "function": {"name": "noop"}}])
    assert bare.tools[0]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert bare.template_tools() == [dict(bare.tools[0])]


def _many(n):
    return [{"type": "function", "function": {"name": f"f{i}"}} for i in range(n)]


@pytest.mark.parametrize("args, message", [
    (({"type": "function"},), "tools must be a list"),
    ((_many(MAX_TOOLS + 1),), f"at most {MAX_TOOLS}"),
    (([{"type": "retrieval"}],), "tools[0].type must be \"function\""),
    (([{"type": "function", "function": {"name": "bad name"}}],), "tools[0].function.name"),
    (([{"type": "function", "function": {"name": "x" * 65}}],), "tools[0].function.name"),
    ((_many(1) + _many(1),), "used by more than one tool"),
    (([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "description": "x" * (64 << 10)}}}],), "bytes serialized"),
    (([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],),
     "tools[0].function.parameters: json schema at #/type"),
    (([{"type": "function", "function": {"name": "f", "parameters": []}}],),
     "parameters must be a JSON schema object"),
    ((_many(1), "sometimes"), "tool_choice must be"),
    ((_many(1), {"type": "function", "function": {"name": "g"}}), "'g', which is not in tools"),
    ((_many(1), {"type": "function"}), "tool_choice object must be"),
    (([], "required"), "needs a non-empty tools list"),
    ((_many(1), "auto", "yes"), "parallel_tool_calls must be a boolean"),
])
def test_validation_errors_name_the_problem(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_tools(*args)


# ------------------------------------------------------------------------------ template inputs


def test_chat_template_inputs_decode_arguments_and_name_tool_results():
    cfg = validate_tools([WEATHER])
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abcdefghijklmnopqrstuvwx", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_abcdefghijklmnopqrstuvwx",
         "content": [{"type": "text", "text": "-3 C"}]},
    ]
    out, tools = chat_template_inputs(messages, cfg)
    assert tools == [WEATHER] or tools[0]["function"]["name"] == "get_weather"
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert out[2] == {"role": "tool", "tool_call_id": "call_abcdefghijklmnopqrstuvwx",
                      "content": "-3 C", "name": "get_weather"}
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    mistral, _ = chat_template_inputs(messages, cfg, parser="mistral")
    assert mistral[1]["tool_calls"][0]["id"] == mistral[2]["tool_call_id"] == "pqrstuvwx"
    with pytest.raises(ValueError, match=r"messages\[0\].tool_calls\[0\].function.arguments"):
        chat_template_inputs([{"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{oops"}}]}])


def test_tools_render_through_a_qwen_style_template():
    from llm_engine.runtime.chat_template import _compile, _normalize_messages, _plain, _render

    template = (
        "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
        "{% for m in messages %}{% if m.tool_calls %}{% for tc in m.tool_calls %}"
        "{% set tc = tc.function %}<tool_call>{\"name\": \"{{ tc.name }}\", \"arguments\": "
        "{{ tc.arguments | tojson }}}</tool_call>{% endfor %}"
        "{% elif m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>"
        "{% else %}{{ m.content }}{% endif %}{% endfor %}")
    cfg = validate_tools([TIME])
    msgs, tools = chat_template_inputs([
        {"role": "user", "content": "time?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "function": {
            "name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}], cfg)
    text = _render(_compile(template), None, messages=_normalize_messages(msgs),
                   tools=_plain(tools))
    assert '"name": "get_time"' in text.split("</tools>")[0]
    assert '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>' in text
    assert "<tool_response>12:00</tool_response>" in text
    assert detect_parser(template) == "hermes"


# ------------------------------------------------------------------------------ parsers


HERMES_PARALLEL = ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": '
                   '{"city": "Oslo", "unit": "c", "days": 2}}\n</tool_call>\n<tool_call>\n'
                   '{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')

CASES = [
    ("hermes", '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>',
     None, [("get_time", {"tz": "UTC"})]),
    ("hermes", HERMES_PARALLEL, "Checking both.\n",
     [("get_weather", {"city": "Oslo", "unit": "c", "days": 2}), ("get_time", {"tz": "CET"})]),
    ("hermes", 'x <tool_call>{"arguments": {"s": "a}\\"{"}, "name": "f"}', "x ",
     [("f", {"s": 'a}"{'})]),  # unclosed last block, keys in either order, braces in strings
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
     '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>', []),  # malformed
    ("hermes", "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    ("hermes", "a < b and <tool_ca", "a < b and <tool_ca", []),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"k\\": 1}"}</tool_call>', None,
     [("f", {"k": 1})]),  # arguments as JSON text
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ("llama3", '{"name": "get_time", "parameters": {"tz": "UTC"}}', None,
     [("get_time", {"tz": "UTC"})]),
    ("llama3", '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": '
     '{"x": [1, {"y": null}]}}', None, [("a", {}), ("b", {"x": [1, {"y": None}]})]),
    ("llama3", 'Sure: <|python_tag|>{"name": "a", "arguments": {"q": 1}}', "Sure: ",
     [("a", {"q": 1})]),
    ("llama3", '{"answer": 42}', '{"answer": 42}', []),  # plain JSON content
    ("llama3", '{"name": "a", "parameters": {"q": 1}', '{"name": "a", "parameters": {"q": 1}',
     []),
    ("llama3", "The answer is {x}.", "The answer is {x}.", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "UTC"}}, '
     '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "f", "days": 1}}]', None,
     [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Rome", "unit": "f", "days": 1})]),
    ("mistral", 'Let me look.[TOOL_CALLS] {"name": "f", "arguments": {}}', "Let me look.",
     [("f", {})]),
    ("mistral", "[TOOL_CALLS]oops", "[TOOL_CALLS]oops", []),
    ("mistral", "no calls [TOOL", "no calls [TOOL", []),
    # Mistral v11+: the marker before each call, the name, [ARGS], the arguments object
    ("mistral", '[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}[TOOL_CALLS]get_weather[ARGS]'
     '{"city": "Rome", "unit": "f", "days": 1}', None,
     [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Rome", "unit": "f", "days": 1})]),
    ("mistral", 'Checking.[TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS] {"k": [1, {"x": "}["}]}',
     "Checking.", [("f", {"k": [1, {"x": "}["}]})]),  # an echoed call id is dropped
    ("mistral", '[TOOL_CALLS]f{"a": 1}', None, [("f", {"a": 1})]),  # [ARGS] skipped as special
    ("mistral", '[TOOL_CALLS]f[ARGS]{}\n\nDone.', "Done.", [("f", {})]),
    ("mistral", "[TOOL_CALLS]f[ARGS]not json", "[TOOL_CALLS]f[ARGS]not json", []),
    ("mistral", "[TOOL_CALLS]bad name[ARGS]{}", "[TOOL_CALLS]bad name[ARGS]{}", []),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1[TOOL_CALLS]g[ARGS]{}', '[TOOL_CALLS]f[ARGS]{"a": 1',
     [("g", {})]),  # a call cut short by the next marker is content; the next one parses
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": []}[TOOL_CALLS]', "[TOOL_CALLS]", [("f", {"a": []})]),
]


@pytest.mark.parametrize("fmt, text, content, expected", CASES)
def test_parse(fmt, text, content, expected):
    got_content, got = calls(parse_tool_calls(text, fmt))
    assert got_content == content
    assert got == expected


def test_call_ids_are_openai_shaped_and_unique():
    _, cs = parse_tool_calls(HERMES_PARALLEL, "hermes")
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in cs)
    assert len({c.id for c in cs}) == 2
    assert cs[0].to_openai()["function"]["name"] == "get_weather"


def stream(fmt, text, cuts, max_calls=None):
    p = streaming_parser(fmt, max_calls)
    deltas, prev = [], 0
    for cut in [*cuts, len(text)]:
        deltas.append(p.feed(text[prev:cut]))
        prev = cut
    deltas.append(p.finish())
    content = "".join(d.content for d in deltas)
    by_index: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls:
            o = tc.to_openai()
            if tc.index not in by_index:  # first delta of a call: id and name
                assert tc.id is not None and tc.name is not None and o["type"] == "function"
                by_index[tc.index] = {"id": tc.id, "name": tc.name, "arguments": ""}
            else:
                assert tc.id is None and tc.name is None
            by_index[tc.index]["arguments"] += tc.arguments
    assert sorted(by_index) == list(range(len(by_index)))
    return content, [by_index[i] for i in sorted(by_index)], p.result()


# streamed, these send a name before the JSON turns out bad
BREAKS_AFTER_NAME = {CASES[3][1], CASES[7][1], '[TOOL_CALLS]f[ARGS]{"a": 1[TOOL_CALLS]g[ARGS]{}'}


@pytest.mark.parametrize("fmt, text, content, expected",
                         [c for c in CASES if c[1] not in BREAKS_AFTER_NAME])
def test_streaming_matches_whole_parse_for_random_chunkings(fmt, text, content, expected):
    rng = random.Random(hash(text) & 0xFFFF)
    for trial in range(40):
        if trial == 0:
            cuts = list(range(1, len(text)))  # one character at a time
        else:
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(12, len(text) - 1))))
        got_content, got_calls, (res_content, res_calls) = stream(fmt, text, cuts)
        if expected:  # the streamed calls are the parsed calls, same ids
            assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == expected
            assert [c["id"] for c in got_calls] == [c.id for c in res_calls]
            assert [c["arguments"] for c in got_calls] == [c.arguments for c in res_calls]
        assert got_content.strip() == (content or "").strip()
        assert (res_content, [(c.name, json.loads(c.arguments)) for c in res_calls]) == \
            (content, expected)


def test_streaming_call_that_breaks_after_its_name_stays_a_call():
    text = CASES[3][1]
    content, streamed, (res_content, res_calls) = stream("hermes", text, [text.index("\"ar")])
    assert [c["name"] for c in streamed] == ["f"] and content == ""
    assert res_calls == [] and res_content is None  # left out of the result: not well-formed
    for chunks in ([8], [30]):  # the bad block is content or a sent call; the next one parses
        p = streaming_parser("hermes")
        bad = '<tool_call>{"name": "f", "arguments": {"a": 1</tool_call>'
        p.feed(bad[:chunks[0]])
        p.feed(bad[chunks[0]:])
        p.feed('<tool_call>{"name": "g", "arguments": {}}</tool_call>')
        content, cs = p.result()
        assert [c.name for c in cs] == ["g"]
        assert content == (bad if chunks[0] == 8 else None)


PARALLEL_REPLIES = [
    ("hermes", HERMES_PARALLEL + "\nBoth asked.", "Checking both.\n"),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c", '
     '"days": 2}}; {"name": "get_time", "parameters": {"tz": "CET"}}', None),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c", '
     '"days": 2}}, {"name": "get_time", "arguments": {"tz": "CET"}}]', None),
    ("mistral", 'On it.[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo", "unit": "c", "days": 2}'
     '[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}', "On it."),
]


@pytest.mark.parametrize("fmt, text, content", PARALLEL_REPLIES)
def test_max_calls_one_keeps_the_first_call_and_drops_the_rest(fmt, text, content):
    first = ("get_weather", {"city": "Oslo", "unit": "c", "days": 2})
    assert len(parse_tool_calls(text, fmt)[1]) == 2
    assert calls(parse_tool_calls(text, fmt, max_calls=1)) == (content, [first])
    rng = random.Random(len(text))
    for trial in range(20):
        cuts = list(range(1, len(text))) if trial == 0 else \
            sorted(rng.sample(range(1, len(text)), rng.randint(0, 10)))
        got_content, got_calls, (_, res_calls) = stream(fmt, text, cuts, max_calls=1)
        assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == [first]
        assert [c.id for c in res_calls] == [got_calls[0]["id"]]  # never a delta of index 1
        assert got_content.strip() == (content or "").strip()


def test_max_calls_counts_calls_made_not_calls_attempted():
    bad = '<tool_call>{"name": "f", "arguments": {"a": 1</tool_call>'
    good = '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, cs = parse_tool_calls(bad + good + good, "hermes", max_calls=1)
    assert content == bad and [c.name for c in cs] == ["g"]
    # streamed, the bad call's name went out before it broke: it is the one call
    _, streamed, (_, res) = stream("hermes", bad + good + good, [bad.index('"ar')], max_calls=1)
    assert [c["name"] for c in streamed] == ["f"] and res == []
    with pytest.raises(ValueError, match="max_calls must be at least 1"):
        streaming_parser("hermes", 0)


def test_single_call_stop_ends_hermes_at_the_first_call():
    one = validate_tools([WEATHER, TIME], "auto", False)
    assert single_call_stop(one, "hermes") == "</tool_call>"
    assert single_call_stop(validate_tools([WEATHER], "auto", True), "hermes") is None
    assert single_call_stop(validate_tools([WEATHER], "required", False), "hermes") is None
    assert single_call_stop(validate_tools([WEATHER], "none", False), "hermes") is None
    assert single_call_stop(one, "llama3") is None and single_call_stop(one, "mistral") is None
    assert single_call_stop(None, "hermes") is None
    cut = HERMES_PARALLEL[:HERMES_PARALLEL.index("</tool_call>")]  # what generation returns
    assert calls(parse_tool_calls(cut, "hermes", max_calls=1)) == \
        ("Checking both.\n", [("get_weather", {"city": "Oslo", "unit": "c", "days": 2})])


def test_streaming_holds_back_a_possible_marker_and_sends_name_first():
    p = streaming_parser("hermes")
    assert p.feed("Hello <tool").content == "Hello "
    d = p.feed('_call>\n{"name": "get_time", "argu')
    assert d.content == "" and d.tool_calls[0].name == "get_time"
    assert p.feed('ments": {"tz": "U').tool_calls[0].arguments == '{"tz": "U'
    assert p.feed('TC"}}\n</tool_call>').tool_calls[0].arguments == 'TC"}'
    assert not p.finish()
    p = streaming_parser("hermes")
    assert p.feed("a <tool").content == "a "
    assert p.feed("box>").content == "<toolbox>"


# ------------------------------------------------------------------------------ detection


def test_detect_parser():
    assert detect_parser("{% for t in tools %}<tool_call>{% endfor %}") == "hermes"
    assert detect_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_parser("<|start_header_id|>ipython<|end_header_id|>") == "llama3"
    assert detect_parser("{{ '<|python_tag|>' }}") == "llama3"
    assert detect_parser("{{ messages }}") is None and detect_parser(None) is None
    assert detect_parser({"default": "x", "tool_use": "<tool_call>"}) == "hermes"
    assert detect_parser("<tool_call>", override="mistral") == "mistral"
    with pytest.raises(ValueError, match="unknown tool-call parser 'x'"):
        detect_parser("", override="x")
    assert detect_parser("[TOOL_CALLS]{{ name }}[ARGS]{{ args }}") == "mistral"
    smol = ROOT / "engines" / "smollm2" / "tokenizer" / "chat_template.jinja"
    if smol.is_file():
        assert detect_parser(smol.read_text()) is None  # SmolLM2-135M has no tool format


def test_detect_mistral_style():
    assert detect_mistral_style("[TOOL_CALLS][{{ calls | tojson }}]") == "list"
    assert detect_mistral_style("[TOOL_CALLS]{{ name }}[ARGS]{{ args }}") == "args"
    assert detect_mistral_style({"default": "x", "tool_use": "[ARGS]"}) == "args"
    assert detect_mistral_style(None, {"[TOOL_CALLS]": 5, "[ARGS]": 32}) == "args"  # vLLM's test
    assert detect_mistral_style(None, {"[TOOL_CALLS]": 5}) == "list"
    assert detect_mistral_style(None) == "list"


# ------------------------------------------------------------------------------ grammar


def test_grammar_is_none_unless_forced():
    assert constrained_grammar(validate_tools([WEATHER]), "hermes") is None
    assert constrained_grammar(validate_tools([WEATHER], "none"), "hermes") is None
    g = constrained_grammar(validate_tools([WEATHER], "required"), "mistral",
                            special_tokens={"[TOOL_CALLS]": 5})
    assert g.startswith('start: <[5]> "["')
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        constrained_grammar(validate_tools([WEATHER], "required"), "qwen")
    with pytest.raises(ValueError, match="unknown Mistral call style"):
        constrained_grammar(validate_tools([WEATHER], "required"), "mistral", mistral_style="x")


def test_grammar_names_markers_that_are_tokens():
    """Markers that are added tokens are matched as those tokens (<[id]>), the v11 Mistral
    format when [ARGS] is one, and exactly one call without parallel_tool_calls."""
    one = validate_tools([WEATHER, TIME], "required", False)
    hermes = constrained_grammar(one, "hermes", {"<tool_call>": 7, "</tool_call>": 8})
    assert hermes.startswith('start: block\nblock: <[7]> "\\n" call "\\n" <[8]>\n')
    args = constrained_grammar(one, "mistral", {"[TOOL_CALLS]": 5, "[ARGS]": 6})
    assert args.startswith("start: call\ncall: fn_0 | fn_1\n")
    assert 'fn_1: <[5]> "get_time" <[6]> args_1\n' in args
    assert constrained_grammar(one, "mistral", {"[TOOL_CALLS]": 5}).startswith(
        'start: <[5]> "[" call "]"')
    many = validate_tools([WEATHER, TIME], "required", True)
    assert constrained_grammar(many, "mistral", mistral_style="args").startswith("start: call+")


@pytest.fixture(scope="module")
def tok(tokenizer_json):  # noqa: F811  (the fixture imported above)
    """SmolLM2's tokenizer as the grammar engine and as text (test_structured's fixture:
    an engine built here, else converted from the GGUF)."""
    import torch
    from tokenizers import Tokenizer

    from llm_engine.runtime.structured import grammar_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield grammar_tokenizer(tokenizer_json, [2, 0]), Tokenizer.from_str(tokenizer_json)
    torch.set_num_threads(threads)


def decode(compiled, backend, seed, max_steps=600):
    """Random logits leaning to JSON punctuation, digits and EOS, through the grammar's
    mask (tests.test_structured.decode)."""
    import torch

    vocab = backend.get_vocab_size()
    bias = torch.zeros(vocab + 64)
    for ch in '"{}[],:0123456789-.<>\n':
        i = backend.token_to_id(ch)
        if i is not None:
            bias[i] = 6.0
    bias[2] = 6.0
    return decode_masked(compiled, backend, bias, seed, max_steps)


@pytest.mark.parametrize("fmt, style", [("hermes", None), ("llama3", None), ("mistral", "list"),
                                        ("mistral", "args")])
@pytest.mark.parametrize("choice, parallel", [
    ("required", True), ("required", False),
    ({"type": "function", "function": {"name": "get_weather"}}, False)])
def test_constrained_grammar_output_parses_and_validates(tok, fmt, style, choice, parallel):
    import jsonschema

    from llm_engine.runtime.structured import StructuredSpec
    from llm_engine.runtime.structured.compiler import compile_spec

    gtok, backend = tok
    cfg = validate_tools([WEATHER, TIME], choice, parallel)
    grammar = constrained_grammar(cfg, fmt, mistral_style=style)
    compiled = compile_spec(StructuredSpec("grammar", grammar), gtok)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in cfg.tools}
    allowed = {t["function"]["name"] for t in cfg.forced_tools()}
    for seed in range(3):
        text = decode(compiled, backend, seed)
        content, cs = parse_tool_calls(text, fmt)
        assert content is None and cs, text
        assert parallel or len(cs) == 1
        for c in cs:
            assert c.name in allowed
            jsonschema.validate(json.loads(c.arguments), schemas[c.name])
        _, streamed, _ = stream(fmt, text, list(range(1, len(text), 3)))
        assert [(s["name"], s["arguments"]) for s in streamed] == \
            [(c.name, c.arguments) for c in cs]


def test_tool_call_dataclass_shape():
    c = ToolCall("call_x", "f", "{}")
    assert c.to_openai() == {"id": "call_x", "type": "function",
                             "function": {"name": "f", "arguments": "{}"}}
