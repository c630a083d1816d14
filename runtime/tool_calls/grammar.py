"""llguidance grammars that force a call (tool_choice "required" or a named function) with
its arguments held to the function's JSON Schema, and the stop string that ends a reply
after its first call."""

from __future__ import annotations

import json
from collections.abc import Mapping

from llm_engine.runtime.tool_calls.config import PARSERS, ToolConfig
from llm_engine.runtime.tool_calls.detect import MISTRAL_STYLES, detect_mistral_style
from llm_engine.runtime.tool_calls.formats import HermesParser


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
