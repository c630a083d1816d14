"""Parsing a reply into tool calls, shared by the whole-text and streaming paths: the call
and delta types, the JSON object scanner and the format-independent streaming parser."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from llm_engine.runtime.tool_calls.config import new_call_id


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


class ObjectScanner:
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

    def parsed(self) -> Any:
        """The finished object's JSON value; None before it closes or when it is not JSON."""
        if not self.done:
            return None
        try:
            return json.loads(self.text)
        except json.JSONDecodeError:
            return None

    def valid_call(self) -> tuple[str, str] | None:
        """(name, arguments JSON text) if the object is a well-formed call."""
        obj = self.parsed()
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


def held_suffix(text: str, markers: Sequence[str]) -> int:
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
    scanner: ObjectScanner
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
        return held_suffix(rest, self.start_markers)

    def _mode_section(self, out: StreamDelta, final: bool) -> None:
        self._section_step(out, final)

    def _limit_reached(self) -> bool:
        return self.max_calls is not None and self.sent_calls >= self.max_calls

    def _start_call(self, hold: bool = False, scanner: ObjectScanner | None = None) -> None:
        if self._limit_reached():  # a backstop: the modes already drop the rest at the limit
            self.mode = "drop"
            return
        scanner = scanner if scanner is not None else ObjectScanner(self.args_keys)
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
