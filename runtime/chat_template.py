"""Chat-template rendering for templates and conversations nobody here wrote.

Templates come from model repos and conversations from clients, so a render must neither escape
jinja2's sandbox nor hold a thread for long: the environment closes what the stock sandbox leaves
open (underscore attributes planted through `namespace`, the `dict` type itself), and a
`RenderBudget` bounds a render's time and output. Inputs are rebuilt from plain types and
messages normalised the way HF does, so rendered prompts match HF `apply_chat_template`.
Choosing the template and the render call belong to `Tokenizer` (tokenizer.py).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from llm_engine.runtime.tokenizer_errors import TokenizerError, _one_line


@dataclasses.dataclass(frozen=True)
class RenderBudget:
    """Limits on one chat-template render. The checks are cooperative: every call, attribute
    or item lookup, `range` step, message-list step and output chunk of the template looks at
    the clock, so nested loops over a long conversation end at the deadline."""

    seconds: float = 2.0
    max_chars: int = 4 << 20


_BUDGET = threading.local()  # this thread's render: (deadline, seconds) or None


def _check_budget() -> None:
    limit = getattr(_BUDGET, "limit", None)
    if limit is not None and time.monotonic() > limit[0]:
        raise TokenizerError(f"the chat template took longer than its {limit[1]:g} s budget "
                             "for this conversation; send a shorter conversation")


def _render(compiled: jinja2.Template, budget: RenderBudget | None, **variables: Any) -> str:
    if budget is None:
        return compiled.render(**variables)
    _BUDGET.limit = (time.monotonic() + budget.seconds, budget.seconds)
    try:
        chunks, size = [], 0
        for chunk in compiled.generate(**variables):
            size += len(chunk)
            if size > budget.max_chars:
                raise TokenizerError(f"the chat template's output passed its budget of "
                                     f"{budget.max_chars} characters; send a shorter "
                                     "conversation")
            _check_budget()
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        _BUDGET.limit = None


class _BudgetList(list):
    """A list whose iteration checks the render budget (a conversation can be long, and a
    template may loop over it inside another loop)."""

    def __iter__(self):
        for item in list.__iter__(self):
            _check_budget()
            yield item


def _budgeted_range(*args: int):
    for i in safe_range(*args):
        _check_budget()
        yield i


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_budget()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_budget()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_budget()
        return super().getitem(obj, argument)


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}` marks assistant text for training masks. We never build masks, but
    templates that use the tag must still compile, so it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot plant dunder attributes
    (the sandbox only checks reads)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Same signature trick as jinja's Namespace so that `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore attributes on a namespace ({name!r})")


class _TemplateDict:
    """`dict` for templates without exposing the dict type itself (and its class attributes)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes and takes no json.dumps options; templates written for HF
    # rely on its signature and on raw output.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _jinja_version_ok() -> bool:
    try:
        parts = tuple(int(p) for p in jinja2.__version__.split(".")[:3])
    except ValueError:
        return True  # a dev build; assume it is recent
    return parts >= (3, 1, 6)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    if not _jinja_version_ok():
        # Templates come from model repos and are untrusted; older jinja2 has sandbox escapes.
        raise TokenizerError(f"jinja2 {jinja2.__version__} has known sandbox escapes; "
                             "upgrade it with `pip install -U 'jinja2>=3.1.6'`")
    env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True,
                           extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.globals["range"] = _budgeted_range
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not compile (line {e.lineno}: "
                             f"{_one_line(e.message or e)}); fix the template") from e


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types, as HF does: rich objects carry methods
    the sandbox does not know are dangerous, so anything else becomes an inert "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())  # np.bool_(False) must not become a truthy placeholder
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


# HF copies a message's reasoning under each of these names; templates read different ones.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages: list[dict]) -> list[dict]:
    chat = []
    for message in _plain(list(messages)):
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        # APIs send content=None / tool_calls=None; templates handle a missing key, not None.
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None),
                         None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(chat: list[dict], field: bool | str, template: str) -> str | None:
    """Mark where the final message ends so the rendered text can be cut there (HF's
    continue_final_message: prefill the assistant's reply). Returns the untagged final text."""
    if not field:
        return None
    name = field if isinstance(field, str) else "content"
    last = chat[-1]
    final = last.get(name)
    if final is None:
        raise TokenizerError(f'continue_final_message: the final message has no "{name}"')
    fields = [name]
    if name in _REASONING_FIELDS:
        fields = [f for f in _REASONING_FIELDS if last.get(f) == final]
    if not any(f in template for f in fields):
        raise TokenizerError(f'continue_final_message: the chat template never reads "{name}"')
    if isinstance(final, list):
        for block in reversed(final):
            if isinstance(block, dict) and "text" in block:
                final = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                return final
        raise TokenizerError("continue_final_message: the final message has no text block")
    for f in fields:
        last[f] = last[f] + _CONTINUE_TAG
    return final


def _cut_at_final_tag(text: str, final: str) -> str:
    if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise TokenizerError("continue_final_message: the chat template dropped part of the final "
                             "message, so it cannot be continued")
    at = text.rindex(_CONTINUE_TAG.strip())
    if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()  # the template trimmed the message's trailing space


__all__ = ["RenderBudget"]
