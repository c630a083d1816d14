"""A structured-output spec (JSON schema, regex, grammar, choices) is compiled on a worker thread
and its grammar cached: a client sending a huge one would buy compile time and cache memory with
one request. The body limit bounds it first (413); under that, the spec itself is capped at
MAX_STRUCTURED_BYTES of JSON (400 naming the limit) before any compile, and the server keeps
answering."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest

from llm_engine.runtime.server_requests import MAX_STRUCTURED_BYTES


@pytest.fixture(scope="module")
def live(serve_tiny):
    return serve_tiny(max_body_bytes=1 << 20)


def _schema(n_properties: int) -> dict:
    return {"type": "object", "properties": {
        f"field_{i:06d}": {"type": "string", "maxLength": 4} for i in range(n_properties)}}


SPECS = {  # each over MAX_STRUCTURED_BYTES, well under the 1 MiB body limit
    "json_schema": lambda: {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": _schema(3000)}}},
    "vllm-json-text": lambda: {"structured_outputs": {"json": json.dumps(_schema(3000))}},
    "regex": lambda: {"structured_outputs": {"regex": "(a|b)" * 20000}},
    "grammar": lambda: {"structured_outputs": {"grammar": "start: " + " ".join(
        f'"t{i}"' for i in range(12000))}},
    "choice": lambda: {"structured_outputs": {"choice": [f"c{i}" for i in range(12000)]}},
}


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_oversized_spec_is_a_400(live, route, name):
    extra = SPECS[name]()
    param = next(iter(extra))
    head = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else \
        {"prompt": "hi"}
    r = httpx.post(live.url + route, json={**head, "max_tokens": 2, **extra}, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error["param"] == param and str(MAX_STRUCTURED_BYTES) in error["message"], error
    ok = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                    timeout=30)
    assert ok.status_code == 200


def test_spec_over_the_body_limit_is_a_413(live):
    body = {"prompt": "hi", "max_tokens": 2,
            "structured_outputs": {"regex": "a" * (2 << 20)}}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 413, (r.status_code, r.text[:300])
    assert r.json()["error"]["code"] == "request_too_large"


def test_spec_at_the_limit_is_taken(live):
    # just under the cap: accepted and compiled (a regex of one long literal)
    regex = "a" * (MAX_STRUCTURED_BYTES - 64)
    r = httpx.post(live.url + "/v1/completions", json={
        "prompt": "hi", "max_tokens": 2, "structured_outputs": {"regex": regex}}, timeout=60)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    text = r.json()["choices"][0]["text"]
    assert text and set(text) == {"a"}, text
