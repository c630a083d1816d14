"""Tool-calling requests: bounds, shapes and the validated `ToolConfig`."""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import string
from collections.abc import Mapping
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
