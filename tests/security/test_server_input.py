"""Bodies that are valid JSON (or nearly) but built to break the server: deep nesting (the
parser, request validation and chat templates recurse), deeply nested extra fields, and lone
UTF-16 surrogates (no UTF-8 encoding exists for them). Each gets a 400 with the OpenAI error
body, and the server keeps answering."""

from __future__ import annotations

import httpx2 as httpx
import pytest


@pytest.fixture(scope="module")
def live(serve_tiny):
    return serve_tiny(max_body_bytes=1 << 20)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _request(route: str, text: str = "hi", extra: str = "") -> str:
    """A request body for `route` with the prompt `text` (raw JSON string content) and
    `extra` (raw JSON members) appended."""
    head = {"/v1/chat/completions": f'"messages": [{{"role": "user", "content": "{text}"}}]',
            "/detokenize": f'"tokens": [1, 2], "note": "{text}"'}.get(route, f'"prompt": "{text}"')
    return "{" + head + ', "max_tokens": 2' + (", " + extra if extra else "") + "}"


BODIES = {
    "deep-array": lambda route: _deep(5000),
    "deep-object": lambda route: '{"a": ' * 3000 + "1" + "}" * 3000,
    "deep-extra-field": lambda route: _request(route, extra='"x": ' + _deep(5000)),
    "nested-within-parser-limit": lambda route: _request(route, extra='"x": ' + _deep(200)),
    "lone-surrogate-text": lambda route: _request(route, text="hi \\ud800 there"),
    "lone-surrogate-key": lambda route: _request(route, extra='"\\udfff": 1'),
}
ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", sorted(BODIES))
def test_hostile_json_is_a_400(live, route, name):
    r = httpx.post(live.url + route, content=BODIES[name](route).encode(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "nests deeper" in error["message"] or "surrogate" in error["message"], error
    ok = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                    timeout=30)
    assert ok.status_code == 200
