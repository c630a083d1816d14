"""The call formats: Hermes/Qwen `<tool_call>`, Mistral `[TOOL_CALLS]` (list and `[ARGS]`)
and Llama-3 JSON, each a StreamingToolParser; `parse_tool_calls` runs one over a whole
reply."""

from __future__ import annotations

import re
import string

from llm_engine.runtime.tool_calls.config import PARSERS
from llm_engine.runtime.tool_calls.stream import (
    ObjectScanner,
    StreamDelta,
    StreamingToolParser,
    ToolCall,
    held_suffix,
)


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
        return len(rest) - (0 if final else held_suffix(rest, (self.end_marker,))), False

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


class _ArgsScanner(ObjectScanner):
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
        return (self.fixed_name, self.text.strip()) if isinstance(self.parsed(), dict) else None


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
        return len(rest) - (0 if final else held_suffix(rest, self.start_markers)), False

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
            self.pos = len(self.text) - (0 if final else held_suffix(rest, self.start_markers))


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
