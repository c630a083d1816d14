"""Tool calling: request validation, chat-template inputs, output parsers and constrained grammars.

The building blocks for OpenAI `tools` / `tool_choice` / `parallel_tool_calls` in chat
completions (docs/tool-calling.md), used by `engine serve` (runtime/server.py).

* `validate_tools(tools, tool_choice, parallel_tool_calls) -> ToolConfig`: bounds and shapes,
  ValueError naming the offending field.
* `chat_template_inputs(messages, config, parser)`: the `tools` template variable as HF
  templates expect it, and messages with `tool_calls` / `tool` roles normalised for templates.
* Parsers for the model's reply, one per format (`hermes`, `llama3`, `mistral`): whole-text
  (`parse_tool_calls`) and streaming (`StreamingToolParser`), sharing one code path so both
  agree on every well-formed output. `max_calls=1` (parallel_tool_calls false) keeps the first
  call and drops the rest of the reply.
* `detect_parser(chat_template)`: the format from markers in the model's template;
  `detect_mistral_style` tells Mistral's two call formats apart.
* `constrained_grammar(config, parser)`: a llguidance Lark grammar that forces a call (for
  tool_choice "required" or a named function) with arguments held to each function's schema.
* `single_call_stop(config, parser)`: a stop string that ends generation after the first call
  where the format has one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from typing import Any

from llm_engine.runtime.structured.spec import StructuredSpec

MAX_TOOLS = 128
MAX_PARAMETERS_BYTES = 64 << 10
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
PARSERS = ("hermes", "llama3", "mistral")

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An OpenAI-style tool call id: `call_` and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# ------------------------------------------------------------------------------ validation


@dataclasses.dataclass(frozen=True)
class ToolConfig:
    """A request's validated tool settings.

    tools: normalised `{"type": "function", "function": {"name", "description"?,
    "parameters"}}` dicts (parameters defaults to an empty-object schema).
    tool_choice: "auto", "none", "required", or "function" when `function_name` is forced.
    """

    tools: tuple[dict, ...]
    tool_choice: str
    function_name: str | None = None
    parallel_tool_calls: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)

    @property
    def parse_calls(self) -> bool:
        """Whether the reply should be parsed for tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def constrained(self) -> bool:
        """Whether generation must be forced into a call (constrained_grammar applies)."""
        return bool(self.tools) and self.tool_choice in ("required", "function")

    def forced_tools(self) -> tuple[dict, ...]:
        """The tools a constrained call may use."""
        if self.tool_choice == "function":
            return tuple(t for t in self.tools if t["function"]["name"] == self.function_name)
        return self.tools

    def template_tools(self) -> list[dict] | None:
        """The `tools` chat-template variable: None without tools (templates test
        `tools is defined and tools is not none`)."""
        return [json.loads(json.dumps(t)) for t in self.tools] if self.tools else None


def validate_tools(tools: Any, tool_choice: Any = None,
                   parallel_tool_calls: Any = None) -> ToolConfig:
    """Checks a request's `tools`, `tool_choice` and `parallel_tool_calls` (OpenAI shapes).
    Raises ValueError naming the field at fault."""
    if tools is None:
        tools = []
    if not isinstance(tools, (list, tuple)):
        raise ValueError("tools must be a list of {\"type\": \"function\", \"function\": {...}}")
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"tools has {len(tools)} entries; at most {MAX_TOOLS} are allowed")
    normalized, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ValueError(f"{where} must be an object")
        if tool.get("type", "function") != "function":
            raise ValueError(f"{where}.type must be \"function\", got {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ValueError(f"{where}.function must be an object with a name")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"{where}.function.name must match ^[a-zA-Z0-9_-]{{1,64}}$, "
                             f"got {name!r}")
        if name in seen:
            raise ValueError(f"{where}.function.name {name!r} is used by more than one tool")
        seen.add(name)
        out: dict[str, Any] = {"name": name}
        desc = fn.get("description")
        if desc is not None:
            if not isinstance(desc, str):
                raise ValueError(f"{where}.function.description must be a string")
            out["description"] = desc
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise ValueError(f"{where}.function.parameters must be a JSON schema object")
        try:
            size = len(json.dumps(params, ensure_ascii=False).encode())
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}.function.parameters is not JSON: {e}") from None
        if size > MAX_PARAMETERS_BYTES:
            raise ValueError(f"{where}.function.parameters is {size} bytes serialized; at most "
                             f"{MAX_PARAMETERS_BYTES} are allowed")
        try:
            StructuredSpec("json", dict(params))
        except ValueError as e:
            raise ValueError(f"{where}.function.parameters: {e}") from None
        out["parameters"] = json.loads(json.dumps(params))
        if fn.get("strict") is not None:
            if not isinstance(fn["strict"], bool):
                raise ValueError(f"{where}.function.strict must be a boolean")
            out["strict"] = fn["strict"]
        normalized.append({"type": "function", "function": out})

    function_name = None
    if tool_choice is None:
        choice = "auto" if normalized else "none"
    elif isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise ValueError(f"tool_choice must be \"auto\", \"none\", \"required\" or "
                             f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, "
                             f"got {tool_choice!r}")
        choice = tool_choice
    elif isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(fn, Mapping) \
                or not isinstance(fn.get("name"), str):
            raise ValueError("tool_choice object must be {\"type\": \"function\", "
                             "\"function\": {\"name\": ...}}")
        choice, function_name = "function", fn["name"]
        if function_name not in seen:
            raise ValueError(f"tool_choice names function {function_name!r}, which is not "
                             "in tools")
    else:
        raise ValueError("tool_choice must be a string or an object")
    if choice in ("auto", "required") and not normalized:
        raise ValueError(f"tool_choice {choice!r} needs a non-empty tools list")

    if parallel_tool_calls is None:
        parallel = True
    elif isinstance(parallel_tool_calls, bool):
        parallel = parallel_tool_calls
    else:
        raise ValueError("parallel_tool_calls must be a boolean")
    return ToolConfig(tuple(normalized), choice, function_name, parallel)


# ------------------------------------------------------------------------------ template inputs


def _mistral_id(call_id: str) -> str:
    """Mistral templates require 9 alphanumeric characters (as vLLM does: the last 9)."""
    alnum = "".join(c for c in call_id if c.isalnum())
    return alnum[-9:].rjust(9, "0")


def chat_template_inputs(messages: Sequence[Mapping[str, Any]], config: ToolConfig | None = None,
                         parser: str | None = None) -> tuple[list[dict], list[dict] | None]:
    """Messages and the `tools` variable for `Tokenizer.apply_chat_template(messages,
    tools=tools)`.

    Assistant `tool_calls` arguments arrive as JSON text (OpenAI) while HF templates (Qwen2.5,
    Hermes, Llama 3.1, Mistral) write them with `| tojson` and so need a dict: they are decoded.
    Each call gets `"type": "function"`, and a message of calls without content gets `""`
    (OpenAI clients send null; templates concatenate it). `tool` messages get their content as
    one string and a `name` looked up from the call they answer (some templates print it). With
    parser "mistral", call ids become the 9 alphanumerics Mistral templates demand."""
    names: dict[str, str] = {}
    out: list[dict] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object")
        m = dict(message)
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise ValueError(f"messages[{i}].tool_calls must be a list")
            norm = []
            for j, call in enumerate(calls):
                where = f"messages[{i}].tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                    raise ValueError(f"{where}.function must be an object with a name")
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}.function.arguments is not valid JSON: "
                                         f"{e.msg}") from None
                c = {**call, "type": "function",
                     "function": {**fn, "arguments": args}}
                if isinstance(call.get("id"), str):
                    names[call["id"]] = fn["name"]
                    if parser == "mistral":
                        c["id"] = _mistral_id(call["id"])
                norm.append(c)
            m["tool_calls"] = norm
            if m.get("content") is None:  # templates concatenate it (Qwen3, Devstral)
                m["content"] = ""
        if m.get("role") == "tool":
            content = m.get("content")
            if isinstance(content, list):  # text parts
                m["content"] = "".join(p.get("text", "") for p in content
                                       if isinstance(p, Mapping))
            elif content is None:
                m["content"] = ""
            call_id = m.get("tool_call_id")
            if isinstance(call_id, str):
                if "name" not in m and call_id in names:
                    m["name"] = names[call_id]
                if parser == "mistral":
                    m["tool_call_id"] = _mistral_id(call_id)
        out.append(m)
    return out, (config.template_tools() if config is not None else None)


# ------------------------------------------------------------------------------ detection


_MARKERS = (("hermes", ("<tool_call>",)), ("mistral", ("[TOOL_CALLS]",)),
            ("llama3", ("<|python_tag|>", "ipython")))


def detect_parser(chat_template: str | Mapping[str, str] | None,
                  override: str | None = None) -> str | None:
    """The tool-call format a chat template writes, from its markers; `override` (a name in
    PARSERS) wins. None when no marker is found (tools cannot be parsed for this model)."""
    if override is not None:
        if override not in PARSERS:
            raise ValueError(f"unknown tool-call parser {override!r}; choose one of "
                             f"{', '.join(PARSERS)}")
        return override
    if isinstance(chat_template, Mapping):
        chat_template = chat_template.get("tool_use") or chat_template.get("default")
    if not chat_template:
        return None
    for name, markers in _MARKERS:
        if any(m in chat_template for m in markers):
            return name
    return None


MISTRAL_STYLES = ("list", "args")


def detect_mistral_style(chat_template: str | Mapping[str, str] | None = None,
                         tokens: Mapping[str, int] | None = None) -> str:
    """Which of Mistral's call formats the model writes: "args" (tokenizer v11 and later:
    Mistral Small 3.2, Magistral, Devstral; `[TOOL_CALLS]name[ARGS]{...}` per call) when its
    tokenizer has an `[ARGS]` token (`tokens`: marker -> id; vLLM's test) or its template
    writes `[ARGS]`, else "list" (`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`). The
    parser reads both; the forcing grammar must pick one."""
    if tokens and "[ARGS]" in tokens:
        return "args"
    if isinstance(chat_template, Mapping):
        chat_template = chat_template.get("tool_use") or chat_template.get("default")
    return "args" if chat_template and "[ARGS]" in chat_template else "list"


# ------------------------------------------------------------------------------ parsing


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """One OpenAI streaming tool-call delta: the first for a call carries id and name, later
    ones argument fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        d: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            d["id"] = self.id
            d["type"] = "function"
        fn: dict[str, Any] = {}
        if self.name is not None:
            fn["name"] = self.name
        if self.arguments or self.name is not None:
            fn["arguments"] = self.arguments
        d["function"] = fn
        return d


@dataclasses.dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


class _ObjectScanner:
    """Follows one JSON object character by character: finds its top-level keys, the raw text
    span of each value, and when the object closes. Constant work per character."""

    def __init__(self, args_keys: tuple[str, ...]) -> None:
        self.args_keys = args_keys
        self.text = ""
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.expect = "open"  # open key colon value strvalue scalar nested after done
        self.key: str | None = None
        self.key_start = 0
        self.value_start = 0
        self.last_nonws = 0
        self.values: dict[str, tuple[int, int]] = {}
        self.first_key: str | None = None
        self.error = False
        self.args_key: str | None = None  # the arguments key, once its value started
        self.args_start = 0

    @property
    def done(self) -> bool:
        return self.expect == "done"

    def feed(self, text: str) -> int:
        """Consumes characters until the object closes or fails; returns how many it used."""
        base = len(self.text)
        self.text += text  # _step reads keys from here; trimmed to what was used below
        used = len(text)
        for n, c in enumerate(text):
            if self.done or self.error:
                used = n
                break
            self._step(c, base + n)
        self.text = self.text[:base + used]
        return used

    def _end_value(self, end: int) -> None:
        self.values[self.key] = (self.value_start, end)
        self.expect = "after"

    def _step(self, c: str, i: int) -> None:
        if self.in_str:
            if self.esc:
                self.esc = False
            elif c == "\\":
                self.esc = True
            elif c == '"':
                self.in_str = False
                if self.depth == 1 and self.expect == "key":
                    try:
                        self.key = json.loads(self.text[self.key_start:i + 1])
                    except json.JSONDecodeError:
                        self.error = True
                        return
                    if self.first_key is None:
                        self.first_key = self.key
                    self.expect = "colon"
                elif self.depth == 1 and self.expect == "strvalue":
                    self._end_value(i + 1)
            return
        if c in " \t\r\n":
            return
        if self.expect == "open":
            if c == "{":
                self.depth, self.expect = 1, "key"
            else:
                self.error = True
        elif self.expect == "key":
            if c == '"':
                self.in_str, self.key_start = True, i
            elif c == "}" and not self.values:
                self.depth, self.expect = 0, "done"
            else:
                self.error = True
        elif self.expect == "colon":
            self.expect = "value" if c == ":" else self.expect
            self.error = c != ":"
        elif self.expect == "value":
            self.value_start = i
            if self.key in self.args_keys:
                self.args_key, self.args_start = self.key, i
            if c == '"':
                self.in_str, self.expect = True, "strvalue"
            elif c in "{[":
                self.depth, self.expect = 2, "nested"
            elif c in ",}]:":
                self.error = True
            else:
                self.expect, self.last_nonws = "scalar", i
        elif self.expect == "scalar":
            if c in ",}":
                self._end_value(self.last_nonws + 1)
                self._step(c, i)
            else:
                self.last_nonws = i
        elif self.expect == "nested":
            if c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self._end_value(i + 1)
        elif self.expect == "after":
            if c == ",":
                self.expect = "key"
            elif c == "}":
                self.depth, self.expect = 0, "done"
            else:
                self.error = True

    # --------------------------------------------------------------- what is known so far

    def name(self) -> str | None:
        span = self.values.get("name")
        if span is None:
            return None
        try:
            value = json.loads(self.text[span[0]:span[1]])
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, str) else None

    def args_prefix(self) -> tuple[str, bool]:
        """(raw argument text known so far, complete?). Object values stream raw; a string value
        (arguments sent as JSON text) is only known once complete."""
        if self.args_key is None:
            return "", False
        span = self.values.get(self.args_key)
        if span is not None:
            raw = self.text[span[0]:span[1]]
            if raw.startswith('"'):
                try:
                    return json.loads(raw), True
                except json.JSONDecodeError:
                    return "", False
            return raw, True
        raw = self.text[self.args_start:]
        if raw.startswith("{") or raw.startswith("["):
            return raw, False
        return "", False

    def valid_call(self) -> tuple[str, str] | None:
        """(name, arguments JSON text) if the object is a well-formed call."""
        if not self.done:
            return None
        try:
            obj = json.loads(self.text)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        if self.args_key is None:
            if any(k in obj for k in self.args_keys):
                return None
            return obj["name"], "{}"
        args = obj[self.args_key]
        raw, _ = self.args_prefix()
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        return obj["name"], raw


def _held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of `text` that could begin one of `markers`."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), 0, -1):
            if text.endswith(m[:k]):
                best = max(best, k)
                break
    return best


@dataclasses.dataclass
class _Call:
    scanner: _ObjectScanner
    raw_start: int  # where the call's text began in the parser's input (for malformed calls)
    index: int | None = None  # stream index once its first delta went out
    id: str | None = None
    sent_args: int = 0
    hold_until_complete: bool = False


class StreamingToolParser:
    """Parses a reply's text deltas into content deltas and tool-call deltas.

    feed(delta) -> StreamDelta; finish() -> StreamDelta (flushes held text at the end of
    generation); result() -> (content or None, [ToolCall]) after finish, the same as
    parse_tool_calls on the whole text.

    Text that may be the start of a call marker is held back until it is known. A call's first
    delta (id, name) goes out once its name is complete, then argument fragments as they come.
    A call whose JSON turns out malformed becomes content (its raw text, markers included) if
    nothing of it was sent yet; one that breaks after its name was sent stays a call (streaming
    cannot take text back) but is left out of result().

    `max_calls`: once that many calls were sent (1 for parallel_tool_calls false), the rest of
    the reply is dropped, so no delta of a further call can go out and result() holds at most
    that many calls.
    """

    format: str = ""
    start_markers: tuple[str, ...] = ()
    args_keys: tuple[str, ...] = ("arguments", "parameters")

    def __init__(self, max_calls: int | None = None) -> None:
        if max_calls is not None and max_calls < 1:
            raise ValueError(f"max_calls must be at least 1, got {max_calls}")
        self.max_calls = max_calls
        self.text = ""  # everything fed
        self.pos = 0  # next unprocessed character of self.text
        self.mode = "content"
        self.content: list[str] = []  # content sent, for result()
        self.calls: list[_Call] = []
        self.sent_calls = 0
        self.finished = False
        self.cur: _Call | None = None
        self.section_start = 0
        self._after_call = False
        self._result_calls: list[ToolCall] = []

    # ------------------------------------------------------------------- format hooks

    def _find_start(self, text: str, at_start: bool) -> tuple[int, int, str] | None:
        """(index, length, marker) of the next call-section start in text, or None."""
        best = None
        for m in self.start_markers:
            j = text.find(m)
            if j >= 0 and (best is None or j < best[0]):
                best = (j, len(m), m)
        return best

    # ------------------------------------------------------------------- machinery

    def feed(self, delta: str) -> StreamDelta:
        if self.finished:
            raise RuntimeError("feed after finish")
        self.text += delta
        out = StreamDelta()
        self._run(out, final=False)
        return out

    def finish(self) -> StreamDelta:
        out = StreamDelta()
        if not self.finished:
            self._run(out, final=True)
            self.finished = True
        return out

    def result(self) -> tuple[str | None, list[ToolCall]]:
        if not self.finished:
            self.finish()
        content = "".join(self.content)
        return (content if content.strip() else None), list(self._result_calls)

    def _emit_content(self, out: StreamDelta, text: str) -> None:
        if self._after_call:  # whitespace right after a call is dropped
            text = text.lstrip()
            if text:
                self._after_call = False
        if text:
            out.content += text
            self.content.append(text)

    def _run(self, out: StreamDelta, final: bool) -> None:
        while True:
            before = (self.pos, self.mode)
            getattr(self, "_mode_" + self.mode)(out, final)
            if (self.pos, self.mode) == before:
                break

    def _mode_text(self, out: StreamDelta, final: bool) -> None:
        """The rest of the reply is plain content."""
        if self.pos < len(self.text):
            self._emit_content(out, self.text[self.pos:])
            self.pos = len(self.text)

    def _mode_drop(self, out: StreamDelta, final: bool) -> None:
        """The rest of the reply is dropped (after a call that broke once sent)."""
        self.pos = len(self.text)

    def _mode_content(self, out: StreamDelta, final: bool) -> None:
        rest = self.text[self.pos:]
        found = self._find_start(rest, at_start=not self.calls and not self.content
                                 and not self.text[:self.pos].strip())
        if found is not None:
            j, n, _ = found
            self._emit_content(out, rest[:j])
            self.section_start = self.pos + j
            self.pos += j + n
            self.mode = "section"
            return
        keep = 0 if final else self._hold(rest)
        if self._after_call and not final and not rest[:len(rest) - keep].strip():
            return  # whitespace after a call: wait for what follows
        self._emit_content(out, rest[:len(rest) - keep])
        self.pos += len(rest) - keep

    def _hold(self, rest: str) -> int:
        return _held_suffix(rest, self.start_markers)

    def _mode_section(self, out: StreamDelta, final: bool) -> None:
        self._section_step(out, final)

    def _limit_reached(self) -> bool:
        return self.max_calls is not None and self.sent_calls >= self.max_calls

    def _start_call(self, hold: bool = False, scanner: _ObjectScanner | None = None) -> None:
        if self._limit_reached():  # a backstop: the modes already drop the rest at the limit
            self.mode = "drop"
            return
        scanner = scanner if scanner is not None else _ObjectScanner(self.args_keys)
        self.cur = _Call(scanner, self.pos, hold_until_complete=hold)
        self.calls.append(self.cur)
        self.mode = "call"

    def _mode_call(self, out: StreamDelta, final: bool) -> None:
        call = self.cur
        sc = call.scanner
        rest = self.text[self.pos:]
        limit, at_end = self._call_limit(rest, final)
        used = sc.feed(rest[:limit])
        self.pos += used
        if sc.error or ((final or at_end) and not sc.done):
            self._malformed(out, call)
            return
        valid = sc.valid_call() if sc.done else None
        if sc.done and valid is None:
            self._malformed(out, call)
            return
        self._send(out, call, force=True)
        if sc.done:
            self._result_calls.append(ToolCall(call.id, *valid))
            self.cur = None
            self._after_call = True
            self.mode = "drop" if self._limit_reached() else self.after_call_mode

    def _call_limit(self, rest: str, final: bool) -> tuple[int, bool]:
        """How much of `rest` the call object may take; True when that is up to a marker
        that ends the call (then the object must be complete)."""
        return len(rest), False

    def _send(self, out: StreamDelta, call: _Call, force: bool = False) -> None:
        sc = call.scanner
        if call.hold_until_complete and not (force and sc.done):
            return
        if call.index is None:
            name = sc.name()
            if name is None:
                return
            call.index, call.id = self.sent_calls, new_call_id()
            self.sent_calls += 1
            out.tool_calls.append(ToolCallDelta(call.index, call.id, name, ""))
        raw, _ = sc.args_prefix()
        if sc.done and not raw:  # a call without arguments
            raw = "{}"
        if len(raw) > call.sent_args:
            out.tool_calls.append(ToolCallDelta(call.index, arguments=raw[call.sent_args:]))
            call.sent_args = len(raw)

    def _malformed(self, out: StreamDelta, call: _Call) -> None:
        """A call that is not well-formed JSON with a name: if nothing of it was sent, the
        text from its section's start (or from the call, after earlier calls of a list) is
        content; otherwise the rest of its block is dropped."""
        self.cur = None
        self.calls.remove(call)
        if call.index is None:
            start = self.section_start
            if not self.block_per_call and any(c.scanner.done for c in self.calls
                                                if c.raw_start > self.section_start):
                start = call.raw_start
            self.pos, self.mode = start, self.malformed_mode
        else:
            self.mode = "drop" if self._limit_reached() else self.broken_call_mode

    after_call_mode = "section"
    broken_call_mode = "drop"
    malformed_mode = "text"
    block_per_call = False

    def _section_step(self, out: StreamDelta, final: bool) -> None:
        raise NotImplementedError


class HermesParser(StreamingToolParser):
    """Hermes / Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one or
    several, after optional content. Text after a call's object up to `</tool_call>` is
    ignored; an unclosed last block still counts (generation stopped at its end)."""

    format = "hermes"
    start_markers = ("<tool_call>",)
    end_marker = "</tool_call>"
    after_call_mode = "skip"
    broken_call_mode = "skip"
    block_per_call = True

    def _section_step(self, out: StreamDelta, final: bool) -> None:
        rest = self.text[self.pos:]
        stripped = rest.lstrip()
        if not stripped:
            if final:  # `<tool_call>` and nothing after it
                self.pos, self.mode = self.section_start, "text"
            return
        self.pos += len(rest) - len(stripped)
        self._start_call()

    def _call_limit(self, rest: str, final: bool) -> tuple[int, bool]:
        j = rest.find(self.end_marker)
        if j >= 0:
            return j, True
        return len(rest) - (0 if final else _held_suffix(rest, (self.end_marker,))), False

    malformed_mode = "badblock"

    def _mode_badblock(self, out: StreamDelta, final: bool) -> None:
        """A malformed block (nothing of it sent): its text, markers included, is content."""
        j = self.text.find(self.end_marker, self.pos + len(self.start_markers[0]))
        if j >= 0 or final:
            end = j + len(self.end_marker) if j >= 0 else len(self.text)
            self._emit_content(out, self.text[self.pos:end])
            self.pos, self.mode = end, "content"

    def _mode_skip(self, out: StreamDelta, final: bool) -> None:
        """To the end of the block."""
        j = self.text.find(self.end_marker, self.pos)
        if j >= 0:
            self.pos, self.mode = j + len(self.end_marker), "content"
        elif final:
            self.pos = len(self.text)


class _ArgsScanner(_ObjectScanner):
    """A call whose name came before its JSON (Mistral v11: `name[ARGS]{...}`): the object
    scanned is the arguments themselves. The name is only known once the object has opened,
    so a call whose arguments are not an object is never sent."""

    def __init__(self, name: str) -> None:
        super().__init__(())
        self.fixed_name = name

    def name(self) -> str | None:
        return self.fixed_name if self.expect != "open" else None

    def args_prefix(self) -> tuple[str, bool]:
        return (self.text.lstrip() if self.expect != "open" else ""), self.done

    def valid_call(self) -> tuple[str, str] | None:
        if not self.done:
            return None
        try:
            obj = json.loads(self.text)
        except json.JSONDecodeError:
            return None
        return (self.fixed_name, self.text.strip()) if isinstance(obj, dict) else None


# What may stand between Mistral v11's `[TOOL_CALLS]` and a call's arguments: the name, and the
# `[CALL_ID]id` its templates write in history (a model may echo it; it is read and dropped).
_MISTRAL_HEAD = re.compile(r"([A-Za-z0-9_.-]{1,64})(?:\[CALL_ID\][A-Za-z0-9]{1,64})?")
_MISTRAL_HEAD_CHARS = frozenset(string.ascii_letters + string.digits + "_.-[]")
_MISTRAL_HEAD_MAX = 160


class MistralParser(StreamingToolParser):
    """Mistral, both formats (the first call decides which). Before tokenizer v11:
    `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (one object without the brackets is
    taken too; text after the list is content). From v11 (Mistral Small 3.2, Magistral,
    Devstral): `[TOOL_CALLS]name[ARGS]{...}` per call, the marker repeated before each; text
    between or after calls is content. `[ARGS]` missing (decoded with special tokens skipped)
    or an echoed `[CALL_ID]id` before it are accepted."""

    format = "mistral"
    start_markers = ("[TOOL_CALLS]",)

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self.state = "open"  # open (no call yet); list: items, single, closed; v11: args

    def _find_start(self, text: str, at_start: bool):
        if self.state not in ("open", "args"):  # the list format has one section
            return None
        return super()._find_start(text, at_start)

    def _section_step(self, out: StreamDelta, final: bool) -> None:
        rest = self.text[self.pos:]
        stripped = rest.lstrip()
        if not stripped:
            if final:
                if self.state in ("open", "args"):  # a bare marker at the end
                    self.pos, self.mode = self.section_start, self.malformed_mode
                else:
                    self.pos = len(self.text)
            return
        self.pos += len(rest) - len(stripped)
        c = stripped[0]
        if self.state == "open" and c in "[{":
            self._list_start(c)
        elif self.state in ("open", "args"):
            self._args_start(c)
        elif self.state == "items":
            self._list_item(c)
        else:
            self.state, self.mode = "closed", "content"

    # ------------------------------------------------------------- before v11: one list

    def _list_start(self, c: str) -> None:
        if c == "[":
            self.pos += 1
            self.state = "items"
        else:
            self.state = "single"
            self._start_call()

    def _list_item(self, c: str) -> None:
        if c == "{":
            self._start_call()
        elif c == ",":
            self.pos += 1
        elif c == "]":
            self.pos += 1
            self.state, self.mode = "closed", "content"
        else:
            self.mode = "text"

    # ------------------------------------------------------------- v11: name[ARGS]{...}

    def _args_start(self, c: str) -> None:
        if c in _MISTRAL_HEAD_CHARS:
            self.mode = "head"
        else:
            self.pos, self.mode = self.section_start, self.malformed_mode

    def _commit_args_format(self) -> None:
        """From the first v11 call on, each marker starts one call of its own."""
        self.state = "args"
        self.after_call_mode, self.malformed_mode = "content", "badsection"
        self.broken_call_mode, self.block_per_call = "skipsection", True

    def _mode_head(self, out: StreamDelta, final: bool) -> None:
        """The call's name up to `[ARGS]` (or the arguments' `{`)."""
        rest = self.text[self.pos:]
        stop = next((k for k, ch in enumerate(rest) if ch not in _MISTRAL_HEAD_CHARS), len(rest))
        j = rest.find("[ARGS]", 0, stop)
        if j >= 0:
            head, args_at = rest[:j], j + len("[ARGS]")
        elif stop < len(rest) and rest[stop] == "{":
            head, args_at = rest[:stop], stop
        elif stop == len(rest) and not final and len(rest) <= _MISTRAL_HEAD_MAX:
            return  # the name may go on
        else:
            head, args_at = "", 0
        m = _MISTRAL_HEAD.fullmatch(head)
        if m is None:
            self.pos, self.mode = self.section_start, self.malformed_mode
            return
        self._commit_args_format()
        self.pos += args_at
        self._start_call(scanner=_ArgsScanner(m.group(1)))

    def _call_limit(self, rest: str, final: bool) -> tuple[int, bool]:
        if self.state != "args":
            return len(rest), False
        j = rest.find(self.start_markers[0])  # the next call's marker ends this one
        if j >= 0:
            return j, True
        return len(rest) - (0 if final else _held_suffix(rest, self.start_markers)), False

    def _mode_badsection(self, out: StreamDelta, final: bool) -> None:
        """A v11 section that is no call (nothing of it sent): its marker is content, and so
        is its text up to the next marker (content mode reads it)."""
        end = self.section_start + len(self.start_markers[0])
        self._emit_content(out, self.text[self.section_start:end])
        self.pos, self.mode = end, "content"

    def _mode_skipsection(self, out: StreamDelta, final: bool) -> None:
        """The rest of a v11 call that broke once sent, up to the next marker."""
        rest = self.text[self.pos:]
        j = rest.find(self.start_markers[0])
        if j >= 0:
            self.pos, self.mode = self.pos + j, "content"
        else:
            self.pos = len(self.text) - (0 if final else _held_suffix(rest, self.start_markers))


class Llama3Parser(StreamingToolParser):
    """Llama 3.1+ JSON calls: `{"name": ..., "parameters": {...}}` after `<|python_tag|>` or
    as the whole reply; several separated by `;`. A reply that merely starts with `{` may be
    plain JSON content, so its calls are held until their object completes."""

    format = "llama3"
    start_markers = ("<|python_tag|>",)

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self.implicit = False

    def _find_start(self, text: str, at_start: bool):
        if at_start and text.lstrip().startswith("{"):
            self.implicit = True
            return 0, 0, "{"
        return super()._find_start(text, at_start)

    def _hold(self, rest: str) -> int:
        if not self.calls and not self.content and not self.text[:self.pos].strip() \
                and not rest.strip():
            return len(rest)  # leading whitespace: a `{` may follow
        return super()._hold(rest)

    def _section_step(self, out: StreamDelta, final: bool) -> None:
        rest = self.text[self.pos:]
        stripped = rest.lstrip()
        if not stripped:
            if final:
                if self.calls:
                    self.pos = len(self.text)
                else:
                    self.pos, self.mode = self.section_start, "text"
            return
        self.pos += len(rest) - len(stripped)
        c = stripped[0]
        if c == "{":
            self._start_call(hold=self.implicit)
        elif c == ";" and self.calls:
            self.pos += 1
        elif self.calls:
            self.mode = "text"  # text after the calls is content
        else:
            self.pos, self.mode = self.section_start, "text"


_PARSER_CLASSES: dict[str, type[StreamingToolParser]] = {
    "hermes": HermesParser, "llama3": Llama3Parser, "mistral": MistralParser}


def streaming_parser(parser: str, max_calls: int | None = None) -> StreamingToolParser:
    """A fresh streaming parser for a format name in PARSERS; `max_calls` as in
    StreamingToolParser (1 for parallel_tool_calls false)."""
    try:
        cls = _PARSER_CLASSES[parser]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {parser!r}; choose one of "
                         f"{', '.join(PARSERS)}") from None
    return cls(max_calls)


def parse_tool_calls(text: str, parser: str,
                     max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole reply. Content is the text outside the calls (None when only
    whitespace); malformed calls stay in the content as written. With `max_calls`, the reply
    ends where that many calls were made: the rest is dropped."""
    p = streaming_parser(parser, max_calls)
    p.feed(text)
    p.finish()
    return p.result()


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    return parse_tool_calls(text, "hermes")


def parse_llama3(text: str) -> tuple[str | None, list[ToolCall]]:
    return parse_tool_calls(text, "llama3")


def parse_mistral(text: str) -> tuple[str | None, list[ToolCall]]:
    return parse_tool_calls(text, "mistral")


# ------------------------------------------------------------------------------ grammars


def _lark_literal(text: str, special_tokens: Mapping[str, int] | None) -> str:
    if special_tokens and text in special_tokens:
        return f"<[{int(special_tokens[text])}]>"
    return json.dumps(text)


def constrained_grammar(config: ToolConfig, parser: str,
                        special_tokens: Mapping[str, int] | None = None,
                        mistral_style: str | None = None) -> str | None:
    """A llguidance Lark grammar forcing `config`'s tool call(s) in `parser`'s format, for
    `StructuredSpec("grammar", ...)`; None unless tool_choice is "required" or a named function.

    Each call's arguments are held to its function's parameters schema (`%json`), its name to
    the function's, so the reply always parses into calls that validate. Exactly one call
    unless parallel_tool_calls, then one or more. `special_tokens`: marker text -> token id,
    for tokenizers where a marker (`[TOOL_CALLS]`, `[ARGS]`, `<tool_call>`) is one added token,
    special or not (llguidance treats every added token as special, so it cannot be matched as
    text); without it the marker is matched as text. `mistral_style` ("list" or "args", see
    detect_mistral_style) picks Mistral's format; by default "args" when `[ARGS]` is among
    the tokens."""
    if parser not in PARSERS:
        raise ValueError(f"unknown tool-call parser {parser!r}; choose one of "
                         f"{', '.join(PARSERS)}")
    if mistral_style is None:
        mistral_style = detect_mistral_style(None, special_tokens)
    if mistral_style not in MISTRAL_STYLES:
        raise ValueError(f"unknown Mistral call style {mistral_style!r}; choose one of "
                         f"{', '.join(MISTRAL_STYLES)}")
    if not config.constrained:
        return None
    if parser == "mistral" and mistral_style == "args":
        return _mistral_args_grammar(config, special_tokens)
    args_key = "parameters" if parser == "llama3" else "arguments"
    rules, alts = [], []
    for k, tool in enumerate(config.forced_tools()):
        fn = tool["function"]
        schema = {"type": "object",
                  "properties": {"name": {"const": fn["name"]}, args_key: fn["parameters"]},
                  "required": ["name", args_key], "additionalProperties": False}
        rules.append(f"fn_{k}: %json{json.dumps(schema, ensure_ascii=False)}")
        alts.append(f"fn_{k}")
    many = config.parallel_tool_calls
    if parser == "hermes":
        head = ('start: block ("\\n" block)*' if many else "start: block")
        markers = (*HermesParser.start_markers, HermesParser.end_marker)
        open_, close = (_lark_literal(m, special_tokens) for m in markers)
        body = [f'block: {open_} "\\n" call "\\n" {close}']
    elif parser == "mistral":
        marker = _lark_literal("[TOOL_CALLS]", special_tokens)
        head = f'start: {marker} "[" call (", " call)* "]"' if many \
            else f'start: {marker} "[" call "]"'
        body = []
    else:
        head = 'start: call ("; " call)*' if many else "start: call"
        body = []
    return "\n".join([head, *body, "call: " + " | ".join(alts), *rules]) + "\n"


def _mistral_args_grammar(config: ToolConfig, special_tokens: Mapping[str, int] | None) -> str:
    """Mistral v11: `[TOOL_CALLS]name[ARGS]{arguments}`, once or (parallel) repeated."""
    marker = _lark_literal("[TOOL_CALLS]", special_tokens)
    args = _lark_literal("[ARGS]", special_tokens)
    rules, alts = [], []
    for k, tool in enumerate(config.forced_tools()):
        fn = tool["function"]
        rules.append(f"fn_{k}: {marker} {json.dumps(fn['name'])} {args} args_{k}")
        rules.append(f"args_{k}: %json{json.dumps(fn['parameters'], ensure_ascii=False)}")
        alts.append(f"fn_{k}")
    head = "start: call+" if config.parallel_tool_calls else "start: call"
    return "\n".join([head, "call: " + " | ".join(alts), *rules]) + "\n"


def single_call_stop(config: ToolConfig | None, parser: str | None) -> str | None:
    """A stop string that ends generation once the first call is complete, for
    parallel_tool_calls false where the format has an end marker (Hermes' `</tool_call>`; the
    parser takes a block cut there). None where none applies: the other formats have no
    marker that ends a call, and a forced call's grammar ends generation itself. The parser's
    `max_calls=1` is what guarantees one call; this only saves the tokens."""
    if config is None or config.parallel_tool_calls or not config.parse_calls \
            or config.constrained:
        return None
    return HermesParser.end_marker if parser == "hermes" else None


__all__ = [
    "MAX_PARAMETERS_BYTES", "MAX_TOOLS", "MISTRAL_STYLES", "PARSERS", "HermesParser",
    "Llama3Parser", "MistralParser", "StreamDelta", "StreamingToolParser", "ToolCall",
    "ToolCallDelta", "ToolConfig", "chat_template_inputs", "constrained_grammar",
    "detect_mistral_style", "detect_parser", "new_call_id", "parse_hermes", "parse_llama3",
    "parse_mistral", "parse_tool_calls", "single_call_stop", "streaming_parser",
    "validate_tools",
]
