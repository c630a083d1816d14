"""Which call format a model writes, from markers in its chat template and tokens."""

from __future__ import annotations

from collections.abc import Mapping

from llm_engine.runtime.tool_calls.config import PARSERS

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
