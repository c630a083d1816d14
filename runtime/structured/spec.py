"""What a request constrains its output to, parsed from the OpenAI or vLLM request shapes.

The checks here are the cheap, structural ones that give a client a precise message before any
compile: the grammar engine (compiler.py) still rejects what it cannot handle, with its own
message. No schema is translated here: llguidance compiles JSON Schema itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar")

_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
# Keywords whose value is a schema, a list of schemas or a name -> schema map.
_SUBSCHEMA = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then",
              "else", "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties",
                   "dependentSchemas")
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


@dataclass(frozen=True)
class StructuredSpec:
    """kind json: value is a JSON Schema (dict or bool); json_object: value None (any object);
    regex: a pattern (Rust regex syntax, matched whole); choice: a tuple of strings;
    grammar: Lark or GBNF text."""

    kind: Kind
    value: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind {self.kind!r} is not one of "
                             f"{', '.join(KINDS)}")
        if self.kind == "json":
            value = self.value
            if isinstance(value, str):  # vLLM accepts the schema as a JSON string
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise ValueError(f"json schema is not valid JSON: {e}") from None
                object.__setattr__(self, "value", value)
            check_schema(value)
        elif self.kind == "json_object":
            if self.value is not None:
                raise ValueError("json_object takes no value")
        elif self.kind in ("regex", "grammar"):
            if not isinstance(self.value, str) or not self.value.strip():
                raise ValueError(f"{self.kind} must be a non-empty string")
        elif self.kind == "choice":
            if isinstance(self.value, str | bytes) or not isinstance(self.value, list | tuple):
                raise ValueError("choice must be a list of strings")
            if not self.value:
                raise ValueError("choice must list at least one string")
            bad = [c for c in self.value if not isinstance(c, str)]
            if bad:
                raise ValueError(f"choice entries must be strings, got {bad[0]!r}")
            object.__setattr__(self, "value", tuple(self.value))

    @property
    def key(self) -> str:
        """Canonical text for caches: key order and whitespace of a schema do not matter."""
        value = list(self.value) if self.kind == "choice" else self.value
        return self.kind + ":" + json.dumps(value, sort_keys=True, separators=(",", ":"),
                                            ensure_ascii=False)


def check_schema(schema: Any, path: str = "#") -> None:
    """Structural JSON Schema checks; a ValueError names the JSON pointer and the problem."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise ValueError(f"json schema at {path} must be an object or a boolean, "
                         f"got {type(schema).__name__}")
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        for t in names:
            if t not in _JSON_TYPES:
                raise ValueError(f"json schema at {path}/type: {t!r} is not a JSON type "
                                 f"({', '.join(sorted(_JSON_TYPES))})")
    for k in _COUNTS:
        v = schema.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"json schema at {path}/{k} must be a non-negative integer, "
                             f"got {v!r}")
    for k in _BOUNDS:
        v = schema.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise ValueError(f"json schema at {path}/{k} must be a number, got {v!r}")
    for lo, hi in (("minItems", "maxItems"), ("minLength", "maxLength"),
                   ("minimum", "maximum")):
        if isinstance(schema.get(lo), int | float) and isinstance(schema.get(hi), int | float) \
                and schema[lo] > schema[hi]:
            raise ValueError(f"json schema at {path}: {lo} {schema[lo]} > {hi} {schema[hi]}")
    required = schema.get("required")
    if required is not None and (not isinstance(required, list)
                                 or not all(isinstance(r, str) for r in required)):
        raise ValueError(f"json schema at {path}/required must be a list of strings")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise ValueError(f"json schema at {path}/enum must be a non-empty list")
    if "$ref" in schema and not isinstance(schema["$ref"], str):
        raise ValueError(f"json schema at {path}/$ref must be a string")
    if "pattern" in schema and not isinstance(schema["pattern"], str):
        raise ValueError(f"json schema at {path}/pattern must be a string")
    for k in _SUBSCHEMA:
        if k in schema:
            if k == "items" and isinstance(schema[k], list):  # draft 4 tuple form
                for i, s in enumerate(schema[k]):
                    check_schema(s, f"{path}/{k}/{i}")
            else:
                check_schema(schema[k], f"{path}/{k}")
    for k in _SUBSCHEMA_LISTS:
        if k in schema:
            if not isinstance(schema[k], list) or not schema[k]:
                raise ValueError(f"json schema at {path}/{k} must be a non-empty list")
            for i, s in enumerate(schema[k]):
                check_schema(s, f"{path}/{k}/{i}")
    for k in _SUBSCHEMA_MAPS:
        if k in schema:
            if not isinstance(schema[k], Mapping):
                raise ValueError(f"json schema at {path}/{k} must be an object")
            for name, s in schema[k].items():
                check_schema(s, f"{path}/{k}/{name}")


def from_response_format(response_format: Mapping[str, Any] | None) -> StructuredSpec | None:
    """OpenAI `response_format`: {"type": "text"} (None), {"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec("json_object")
    if kind == "json_schema":
        js = response_format.get("json_schema")
        if not isinstance(js, Mapping):
            raise ValueError("response_format.json_schema must be an object with a 'schema'")
        if "schema" not in js:
            raise ValueError("response_format.json_schema.schema is missing")
        try:
            return StructuredSpec("json", js["schema"])
        except ValueError as e:
            raise ValueError(f"response_format.json_schema.schema: {e}") from None
    raise ValueError(f"response_format.type {kind!r} is not one of text, json_object, "
                     "json_schema")


_VLLM_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
              "json_object": "json_object"}


def from_structured_outputs(options: Mapping[str, Any] | None) -> StructuredSpec | None:
    """vLLM-style `structured_outputs`: exactly one of json (schema, dict or JSON text),
    regex, choice, grammar, or json_object: true."""
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise ValueError("structured_outputs must be an object")
    unknown = sorted(set(options) - set(_VLLM_KEYS))
    if unknown:
        raise ValueError(f"structured_outputs: unsupported field(s) {', '.join(unknown)}; "
                         f"use one of {', '.join(_VLLM_KEYS)}")
    given = {k: v for k, v in options.items()
             if v is not None and not (k == "json_object" and v is False)}
    if len(given) != 1:
        raise ValueError("structured_outputs must set exactly one of "
                         f"{', '.join(_VLLM_KEYS)} (got {', '.join(sorted(given)) or 'none'})")
    (k, v), = given.items()
    if k == "json_object":
        if v is not True:
            raise ValueError("structured_outputs.json_object must be true")
        return StructuredSpec("json_object")
    try:
        return StructuredSpec(_VLLM_KEYS[k], v)
    except ValueError as e:
        raise ValueError(f"structured_outputs.{k}: {e}") from None


def parse(value: StructuredSpec | Mapping[str, Any] | None) -> StructuredSpec | None:
    """SamplingParams(structured=...): a spec, or a vLLM-style dict."""
    if value is None or isinstance(value, StructuredSpec):
        return value
    return from_structured_outputs(value)
