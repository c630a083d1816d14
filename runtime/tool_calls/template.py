"""Chat-template inputs: the `tools` variable as HF templates expect it, and assistant
`tool_calls` / `tool` messages normalised for templates."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llm_engine.runtime.tool_calls.config import ToolConfig


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
