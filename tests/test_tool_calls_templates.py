"""Tool calling against real chat templates (tests/fixtures/chat_templates; sources and
licences in its README): Qwen2.5 and Qwen3 (hermes), vLLM's Hermes, Llama 3.1 JSON and Mistral
templates, Mistral Nemo (calls as one list) and Mistral Small 3.2 (v11: `[TOOL_CALLS]name[ARGS]`).

Each template gets a tiny byte-level tokenizer built here with its model's added tokens (special
or not, as the real vocabulary has them), loaded by runtime.tokenizer as an engine's would be;
nothing is downloaded. For each: the format is detected from the template; `tools` renders into
the model's tool section; a conversation with assistant `tool_calls` and `tool` results renders,
and the calls the template writes into history parse back; a realistic reply, encoded with its
special tokens, parses to the same calls whole and streamed token by token (at most one call for
parallel_tool_calls false); and the server's request preparation plus the forcing grammar,
decoded with random logits on that tokenizer, yield calls that parse and validate.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from llm_engine.runtime.detokenizer import IncrementalDetokenizer
from llm_engine.runtime.sampling_params import SamplingParams
from llm_engine.runtime.server import ServerConfig, ServerState
from llm_engine.runtime.server_protocol import GenRequest
from llm_engine.runtime.tokenizer import Tokenizer
from llm_engine.runtime.tool_calls import (
    chat_template_inputs,
    detect_mistral_style,
    detect_parser,
    parse_tool_calls,
    streaming_parser,
    validate_tools,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name", "maxLength": 8,
                 "pattern": "^[a-z]+$"},
        "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                             "enum": ["utc", "cet"]}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "Weather and time in Paris?"}]
CALLS = [("get_weather", {"city": "paris", "unit": "c"}), ("get_time", {"zone": "cet"})]


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A model family's added tokens and named specials (tokenizer_config.json)."""

    special: tuple[str, ...]
    plain: tuple[str, ...] = ()  # added tokens that are not special (decoded either way)
    config: tuple[tuple[str, str], ...] = ()


QWEN = Vocab(("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
             ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>",
              "</think>"), (("eos_token", "<|im_end|>"), ("pad_token", "<|endoftext|>")))
HERMES = Vocab(("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"),
               ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
               (("bos_token", "<|begin_of_text|>"), ("eos_token", "<|im_end|>")))
LLAMA = Vocab(("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"), (),
              (("bos_token", "<|begin_of_text|>"), ("eos_token", "<|eot_id|>")))
MISTRAL = Vocab(("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                 "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), (),
                (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")))
MISTRAL_V11 = dataclasses.replace(MISTRAL, special=(*MISTRAL.special, "[SYSTEM_PROMPT]",
                                                    "[/SYSTEM_PROMPT]", "[ARGS]", "[CALL_ID]",
                                                    "[TOOL_CONTENT]", "[IMG]"))


def _qwen_tools(tools: list[dict]) -> list[str]:
    return ["<tools>\n" + "\n".join(json.dumps(t) for t in tools) + "\n</tools>"]


def _hermes_tools(tools: list[dict]) -> list[str]:
    return [f'{{"type": "function", "function": {{"name": "{t["function"]["name"]}", '
            f'"description": "{t["function"]["name"]}(' for t in tools] + \
        [f'"parameters": {json.dumps(t["function"]["parameters"])}}}' for t in tools]


def _llama_tools(tools: list[dict]) -> list[str]:
    listed = "".join(json.dumps(t, indent=4) + "\n\n" for t in tools)
    return [listed + USER[0]["content"] + "<|eot_id|>"]


def _mistral_tools(opening: str) -> object:
    def expect(tools: list[dict]) -> list[str]:
        return [opening + ", ".join(json.dumps(t) for t in tools) + "][/AVAILABLE_TOOLS][INST]"]
    return expect


@dataclasses.dataclass(frozen=True)
class Case:
    file: str
    vocab: Vocab
    parser: str
    tool_section: object  # tools -> substrings the rendered prompt must hold
    reply: str  # what the model writes for CALLS (one call where the template takes one)
    reply_content: str | None = None
    one_call: bool = False  # the template renders one call per assistant message
    style: str = "list"  # Mistral's call format
    markers: tuple[str, ...] = ()  # markers the tokenizer has as one token

    def __str__(self) -> str:
        return self.file


QWEN_REPLY = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris", "unit": "c"}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "cet"}}\n'
              '</tool_call>')
CASES = [
    Case("qwen2.5-instruct", QWEN, "hermes", _qwen_tools, QWEN_REPLY,
         markers=("<tool_call>", "</tool_call>")),
    Case("qwen3", QWEN, "hermes", _qwen_tools,
         "<think>\nTwo lookups.\n</think>\n\n" + QWEN_REPLY,
         reply_content="<think>\nTwo lookups.\n</think>\n\n",
         markers=("<tool_call>", "</tool_call>")),
    Case("hermes-vllm", HERMES, "hermes", _hermes_tools,
         '<tool_call>\n{"arguments": {"city": "paris", "unit": "c"}, "name": "get_weather"}\n'
         '</tool_call>\n<tool_call>\n{"arguments": {"zone": "cet"}, "name": "get_time"}\n'
         '</tool_call>', markers=("<tool_call>", "</tool_call>")),
    Case("llama3.1-json-vllm", LLAMA, "llama3", _llama_tools,
         '<|python_tag|>{"name": "get_weather", "parameters": {"city": "paris", "unit": "c"}}; '
         '{"name": "get_time", "parameters": {"zone": "cet"}}', one_call=True,
         markers=("<|python_tag|>",)),
    Case("mistral-vllm", MISTRAL, "mistral", _mistral_tools("[AVAILABLE_TOOLS] ["),
         '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "paris", "unit": "c"}}, '
         '{"name": "get_time", "arguments": {"zone": "cet"}}]', markers=("[TOOL_CALLS]",)),
    Case("mistral-nemo-instruct-2407", MISTRAL, "mistral", _mistral_tools("[AVAILABLE_TOOLS]["),
         '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "paris", "unit": "c"}}, '
         '{"name": "get_time", "arguments": {"zone": "cet"}}]', markers=("[TOOL_CALLS]",)),
    Case("mistral-small-3.2-instruct-2506", MISTRAL_V11, "mistral",
         lambda tools: ["[AVAILABLE_TOOLS]" + json.dumps(tools) + "[/AVAILABLE_TOOLS][INST]"],
         'Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "paris", "unit": "c"}'
         '[TOOL_CALLS]get_time[ARGS]{"zone": "cet"}', reply_content="Let me check.",
         style="args", markers=("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")),
]


def _build_tokenizer(path: Path, vocab: Vocab, template: str) -> Tokenizer:
    """A byte-level BPE without merges (any text encodes, and decodes back exactly) plus the
    family's added tokens, saved as an engine's tokenizer/ directory."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in vocab.special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in vocab.plain])
    path.mkdir(parents=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(dict(vocab.config)))
    (path / "chat_template.jinja").write_text(template)
    return Tokenizer.load(path)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    made: dict[str, Tokenizer] = {}

    def get(case: Case) -> Tokenizer:
        if case.file not in made:
            template = (FIXTURES / f"{case.file}.jinja").read_text(encoding="utf-8")
            made[case.file] = _build_tokenizer(tmp_path_factory.mktemp("tok") / case.file,
                                               case.vocab, template)
        return made[case.file]
    return get


def _state(tok: Tokenizer) -> ServerState:
    """The server's per-engine tool state for this tokenizer (nothing else of an engine is
    read when it is made)."""
    return ServerState(SimpleNamespace(engine=SimpleNamespace(tokenizer=tok)), ServerConfig())


def _named(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


# ------------------------------------------------------------------------------ the fixtures


def test_every_fixture_is_covered_and_names_its_source():
    files = {f.stem for f in FIXTURES.glob("*.jinja")}
    assert files == {c.file for c in CASES}
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    for f in files:
        first = (FIXTURES / f"{f}.jinja").read_text(encoding="utf-8").split("\n", 1)[0]
        assert first.startswith("{#- source: ") and first.endswith(" -#}"), f
        assert f"`{f}.jinja`" in readme


@pytest.mark.parametrize("case", CASES, ids=str)
def test_source_comment_does_not_change_rendering(case, toks):
    tok = toks(case)
    msgs, tools = chat_template_inputs(USER, validate_tools(TOOLS), case.parser)
    bare = tok.get_chat_template().split("\n", 1)[1]
    assert tok.apply_chat_template(msgs, tools=tools) == \
        tok.apply_chat_template(msgs, tools=tools, chat_template=bare)


# ------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("case", CASES, ids=str)
def test_detects_the_format_and_its_tokens(case, toks):
    tok = toks(case)
    assert detect_parser(tok.chat_template) == case.parser
    state = _state(tok)
    assert state.tool_parser == case.parser
    assert set(case.markers) <= state.tool_tokens.keys()  # the grammar names them as tokens
    special = {m for m in case.markers if m in case.vocab.special}
    assert state.tool_markers.keys() == special  # decoding must keep these
    if case.parser == "mistral":
        assert state.mistral_style == case.style
        assert detect_mistral_style(tok.chat_template) == case.style  # the template alone


# ------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("case", CASES, ids=str)
def test_tools_render_into_the_tool_section(case, toks):
    tok = toks(case)
    msgs, tools = chat_template_inputs(USER, validate_tools(TOOLS), case.parser)
    text = tok.apply_chat_template(msgs, tools=tools)
    for part in case.tool_section(tools):
        assert part in text, part
    ids = tok.apply_chat_template(msgs, tools=tools, tokenize=True)
    for marker in (*case.vocab.special, *case.vocab.plain):  # markers are single tokens
        assert ids.count(tok.token_to_id(marker)) == text.count(marker), marker
    assert tok.apply_chat_template(msgs) != text  # without tools: no tool section


def _conversation(case: Case) -> list[dict]:
    """OpenAI's shape, as the openai client sends it back: content null, arguments as JSON
    text, `call_` ids; then the tool results."""
    made = CALLS[:1] if case.one_call else CALLS
    ids = [f"call_{i}BcDeFgHiJkLmNoPqRsTuVwX" for i in range(len(made))]
    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in zip(ids, made)]}
    results = [{"role": "tool", "tool_call_id": i, "content": f"result {k} for {n}"}
               for k, (i, (n, _)) in enumerate(zip(ids, made))]
    return [*USER, assistant, *results]


_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "</s>")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_tool_conversation_round_trips(case, toks):
    """The template renders assistant calls and tool results; the calls it writes into the
    history are in the format the parser reads (what the model was trained to write)."""
    tok = toks(case)
    config = validate_tools(TOOLS)
    conversation = _conversation(case)
    msgs, tools = chat_template_inputs(conversation, config, case.parser)
    text = tok.apply_chat_template(msgs, tools=tools)
    for k in range(len(conversation) - 2):  # the tool results
        assert f"result {k} for " in text
    prefix = tok.apply_chat_template(msgs[:1], tools=tools)  # up to the assistant's turn
    assert text.startswith(prefix)
    turn = text[len(prefix):]
    turn = turn[:min((turn.find(e) for e in _END_OF_TURN if e in turn), default=len(turn))]
    made = CALLS[:1] if case.one_call else CALLS
    assert _named(parse_tool_calls(turn, case.parser)[1]) == made, turn
    if case.one_call:  # the template refuses several calls in one message
        with pytest.raises(Exception, match="single tool-calls"):
            tok.apply_chat_template(chat_template_inputs(
                _conversation(dataclasses.replace(case, one_call=False)), config,
                case.parser)[0], tools=tools)


# ------------------------------------------------------------------------------ model replies


def _stream_tokens(tok: Tokenizer, ids: list[int], parser: str, max_calls: int | None):
    """The reply as the engine streams it: one token at a time through the detokenizer, with
    special tokens kept, into the streaming parser."""
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    p = streaming_parser(parser, max_calls)
    deltas = [p.feed(detok.step(i)) for i in ids]
    deltas += [p.feed(detok.flush()), p.finish()]
    content = "".join(d.content for d in deltas)
    sent: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls:
            call = sent.setdefault(tc.index, {"id": tc.id, "name": tc.name, "arguments": ""})
            call["arguments"] += tc.arguments
    return content, [sent[i] for i in sorted(sent)], p.result()


@pytest.mark.parametrize("max_calls", [None, 1])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reply_parses_whole_and_streamed(case, toks, max_calls):
    tok = toks(case)
    ids = tok.encode(case.reply, add_special_tokens=False)
    for marker in case.markers:
        if marker in case.reply:
            assert tok.token_to_id(marker) in ids  # the model emits the marker as one token
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == case.reply
    expected = CALLS[:max_calls]
    content, calls = parse_tool_calls(text, case.parser, max_calls)
    assert (content, _named(calls)) == (case.reply_content, expected)
    streamed_content, streamed, (res_content, res_calls) = _stream_tokens(
        tok, ids, case.parser, max_calls)
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == expected
    assert [c["id"] for c in streamed] == [c.id for c in res_calls]
    assert (res_content, _named(res_calls)) == (case.reply_content, expected)
    assert streamed_content.strip() == (case.reply_content or "").strip()
    if case.markers[0] in case.vocab.special:  # why the server keeps special tokens
        assert case.markers[0] not in tok.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------ the server


def _request(tools_config, **params) -> GenRequest:
    return GenRequest(None, list(USER), SamplingParams(max_tokens=64, **params), 1, False, False,
                      False, None, tools=tools_config)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_server_prepares_tool_requests(case, toks):
    state = _state(toks(case))
    req = _request(validate_tools(TOOLS, "auto", False), stop=["###"])
    _, tools = state.prepare_tools(req)
    assert req.tool_parser == case.parser and tools is not None
    assert req.params.skip_special_tokens == (not state.tool_markers)
    # parallel_tool_calls false: Hermes stops at the first call's end marker
    assert req.params.stop == (["###", "</tool_call>"] if case.parser == "hermes" else ["###"])
    req = _request(validate_tools(TOOLS, "auto", True))
    state.prepare_tools(req)
    assert req.params.stop == [] and req.params.structured is None


def _decode_forced(tok: Tokenizer, spec, seed: int, max_steps: int = 600) -> str:
    """Random logits through the grammar's mask, as the engine samples a forced call."""
    import torch

    from llm_engine.runtime.structured import apply_masks
    from llm_engine.runtime.structured.compiler import compile_spec, from_runtime_tokenizer

    compiled = compile_spec(spec, from_runtime_tokenizer(tok))
    matcher, gen, out = compiled.matcher(), torch.Generator().manual_seed(seed), []
    bias = torch.zeros(tok.vocab_size)
    for eos in tok.eos_token_ids:
        bias[eos] = 4.0  # so parallel grammars end
    for _ in range(max_steps):
        logits = torch.randn((1, tok.vocab_size), generator=gen) * 2 + bias
        token = int(apply_masks(logits, [matcher])[0].argmax())
        matcher.advance(token)
        if token in tok.eos_token_ids:
            return tok.decode(out, skip_special_tokens=False)
        out.append(token)
    raise AssertionError(f"no end in {max_steps} steps: {tok.decode(out)!r}")


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forced_calls_decode_on_the_real_tokens(case, toks, parallel):
    """tool_choice "required": the server's grammar, with this tokenizer's marker tokens,
    decoded under random logits, always parses into calls that validate (one without
    parallel_tool_calls). Markers that are added tokens are named as tokens, so the call
    is written with the model's own marker token, as its parser and template expect."""
    import jsonschema

    tok = toks(case)
    state = _state(tok)
    req = _request(validate_tools(TOOLS, "required", parallel))
    state.prepare_tools(req)
    grammar = req.params.structured.value
    for marker in case.markers:
        if marker != "[CALL_ID]" and case.parser != "llama3":  # llama3's calls are bare JSON
            assert f"<[{tok.token_to_id(marker)}]>" in grammar
    for seed in range(3):
        text = _decode_forced(tok, req.params.structured, seed)
        content, calls = parse_tool_calls(text, case.parser)
        assert content is None and calls, text
        assert parallel or len(calls) == 1
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("spec", [{"choice": ["<tool_call>", "<think>"]},
                                  {"regex": r"<tool_call>[0-9]</tool_call>"},
                                  {"json": {"enum": ["<think>", "</think>"]}}], ids=str)
def test_user_grammars_may_spell_non_special_added_tokens(toks, spec):
    """llguidance treats every added token as special, but tokenizes forced text with the
    full tokenizer, which yields Qwen's non-special <tool_call> / <think> tokens: the mask
    allowed a token its matcher then rejected (the request ended in an error). Non-special
    added tokens are now given to llguidance as the text they are; special ones stay
    matchable only by id."""
    import re

    from llm_engine.runtime.structured.spec import parse

    tok = toks(CASES[1])  # Qwen3: <tool_call>, <think> are added but not special
    assert tok.token_to_id("<think>") is not None
    for seed in range(4):
        text = _decode_forced(tok, parse(spec), seed)
        if "choice" in spec:
            assert text in spec["choice"]
        elif "regex" in spec:
            assert re.fullmatch(spec["regex"], text)
        else:
            assert json.loads(text) in spec["json"]["enum"]
