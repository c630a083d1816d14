"""JSON schemas shared by benchmarks/grammar_engines.py and tests/test_structured.py.

Each case has a valid instance (which a grammar must let through, token by token) and, where the
schema has a constraint worth checking, an invalid instance that breaks exactly that constraint
(which an enforcing grammar must reject). Instances are serialized compactly
(`json.dumps(..., separators=(",", ":"))`): every engine accepts that whitespace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SchemaCase:
    name: str
    schema: dict[str, Any]
    valid: Any
    invalid: Any = None  # None: no single-constraint violation to check
    constraint: str = ""  # what `invalid` breaks (shown in the coverage table)


def dump(instance: Any) -> str:
    # Raw UTF-8 like a model writes, not \uXXXX escapes (llguidance rejects those by default).
    return json.dumps(instance, separators=(",", ":"), ensure_ascii=False)


_PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}

CASES: list[SchemaCase] = [
    SchemaCase("flat_object", _PERSON, {"name": "Ada", "age": 36}, {"name": "Ada"},
               "required key"),
    SchemaCase("nested_object", {
        "type": "object",
        "properties": {
            "user": _PERSON,
            "address": {"type": "object", "properties": {
                "city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]},
        },
        "required": ["user", "address"],
    }, {"user": {"name": "Bo", "age": 3}, "address": {"city": "Oslo", "zip": "0150"}},
        {"user": {"name": "Bo", "age": "3"}, "address": {"city": "Oslo", "zip": "0150"}},
        "nested type"),
    SchemaCase("array_min_max", {
        "type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4,
    }, [1, 2, 3], [1, 2, 3, 4, 5], "maxItems"),
    SchemaCase("array_min_items", {
        "type": "array", "items": {"type": "string"}, "minItems": 2,
    }, ["a", "b"], ["a"], "minItems"),
    SchemaCase("enum_string", {
        "type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    }, {"color": "green"}, {"color": "purple"}, "enum"),
    SchemaCase("const", {
        "type": "object", "properties": {"v": {"const": "v1"}}, "required": ["v"],
    }, {"v": "v1"}, {"v": "v2"}, "const"),
    SchemaCase("integer_range", {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["n"],
    }, {"n": 7}, {"n": 11}, "maximum"),
    SchemaCase("integer_negative_bound", {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0}},
        "required": ["n"],
    }, {"n": 42}, {"n": -3}, "minimum"),
    SchemaCase("number_range", {
        "type": "object",
        "properties": {"t": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
        "required": ["t"],
    }, {"t": 0.25}, {"t": 3.5}, "number maximum"),
    SchemaCase("integer_not_float", {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
    }, {"n": 5}, {"n": 5.5}, "integer"),
    SchemaCase("boolean", {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
    }, {"ok": True}, {"ok": "yes"}, "boolean"),
    SchemaCase("optional_fields", {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"},
                       "c": {"type": "boolean"}},
        "required": ["a"], "additionalProperties": False,
    }, {"a": "x", "c": False}, {"b": 1}, "required with optionals"),
    SchemaCase("additional_false", {
        "type": "object", "properties": {"a": {"type": "integer"}},
        "required": ["a"], "additionalProperties": False,
    }, {"a": 1}, {"a": 1, "z": 2}, "additionalProperties false"),
    SchemaCase("string_pattern", {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
    }, {"code": "ABC-12"}, {"code": "abc-12"}, "pattern"),
    SchemaCase("string_length", {
        "type": "object",
        "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 5}},
        "required": ["s"],
    }, {"s": "abcd"}, {"s": "abcdefg"}, "maxLength"),
    SchemaCase("format_date", {
        "type": "object", "properties": {"d": {"type": "string", "format": "date"}},
        "required": ["d"],
    }, {"d": "2024-02-29"}, {"d": "yesterday"}, "format date"),
    SchemaCase("format_email", {
        "type": "object", "properties": {"e": {"type": "string", "format": "email"}},
        "required": ["e"],
    }, {"e": "ada@example.com"}, {"e": "not an email"}, "format email"),
    SchemaCase("format_uuid", {
        "type": "object", "properties": {"id": {"type": "string", "format": "uuid"}},
        "required": ["id"],
    }, {"id": "123e4567-e89b-12d3-a456-426614174000"}, {"id": "123"}, "format uuid"),
    SchemaCase("defs_ref", {
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"],
    }, {"a": {"x": 1, "y": 2.5}, "b": {"x": -1, "y": 0}},
        {"a": {"x": 1}, "b": {"x": -1, "y": 0}}, "$ref target required"),
    SchemaCase("recursive_ref", {
        "$defs": {"node": {"type": "object", "properties": {
            "v": {"type": "integer"},
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["v"], "additionalProperties": False}},
        "$ref": "#/$defs/node",
    }, {"v": 1, "children": [{"v": 2}, {"v": 3, "children": []}]},
        {"v": 1, "children": [{"w": 2}]}, "recursive $ref"),
    SchemaCase("any_of", {
        "type": "object",
        "properties": {"id": {"anyOf": [{"type": "integer"}, {"type": "string",
                                                              "maxLength": 4}]}},
        "required": ["id"],
    }, {"id": "ab12"}, {"id": True}, "anyOf"),
    SchemaCase("nullable", {
        "type": "object", "properties": {"x": {"type": ["string", "null"]}},
        "required": ["x"],
    }, {"x": None}, {"x": 3}, "type list"),
    SchemaCase("array_of_objects", {
        "type": "object",
        "properties": {"items": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string"},
                           "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False,
    }, {"items": [{"sku": "A1", "qty": 2}, {"sku": "B", "qty": 1}]},
        {"items": [{"sku": "A1", "qty": 0}]}, "minimum in array item"),
    SchemaCase("unicode_strings", {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
    }, {"text": "naïve café — 東京 \"quoted\"\n"}, None),
    SchemaCase("tool_call", {
        "type": "object",
        "properties": {
            "name": {"enum": ["get_weather", "search"]},
            "arguments": {"type": "object", "properties": {
                "location": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14}},
                "required": ["location"], "additionalProperties": False},
        },
        "required": ["name", "arguments"], "additionalProperties": False,
    }, {"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius", "days": 3}},
        {"name": "get_weather", "arguments": {"location": "Paris", "days": 30}}, "nested maximum"),
]

CASES_BY_NAME = {c.name: c for c in CASES}
