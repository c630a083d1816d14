"""Stop lists are checked on every generated token on the engine thread that all requests
share: tens of thousands of stop strings or stop ids in one request used to slow every other
client's tokens (0.08 s -> 18.8 s). Lists and strings over the caps are refused up front (400
over HTTP), and what is allowed stays cheap per token (stop ids are looked up in a set)."""

from __future__ import annotations

import httpx2 as httpx
import pytest

from llm_engine.runtime import SamplingParams
from llm_engine.runtime.sampling_params import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)
from tests.server_harness import tiny_engine


@pytest.mark.parametrize("kwargs", [
    {"stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]},
    {"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]},
    {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))},
])
def test_caps_refuse_oversized_lists(kwargs):
    with pytest.raises(ValueError, match="at most"):
        SamplingParams(**kwargs)


def test_lists_at_the_caps_are_taken():
    p = SamplingParams(stop=["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS,
                       stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)))
    assert len(p.stop) == MAX_STOP_STRINGS and len(p.stop_token_ids) == MAX_STOP_TOKEN_IDS


@pytest.fixture(scope="module")
def live(serve_tiny):
    return serve_tiny(max_body_bytes=1 << 20)


@pytest.mark.parametrize("field, value", [
    ("stop", [f"s{i}" for i in range(50_000)]),
    ("stop_token_ids", list(range(100_000))),
])
def test_the_attack_over_http_is_a_400_and_others_are_served(live, field, value):
    r = httpx.post(live.url + "/v1/completions",
                   json={"prompt": "hi", "max_tokens": 4, field: value}, timeout=30)
    assert r.status_code == 400, r.text[:300]
    assert "at most" in r.json()["error"]["message"]
    ok = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4,
                    "stop": ["zz"] * MAX_STOP_STRINGS}, timeout=30)
    assert ok.status_code == 200, ok.text[:300]


def test_stop_ids_still_stop(engines):
    """The set lookup stops where the list did: the first greedy token, made a stop id."""
    engine = tiny_engine(engines)
    first = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))[0]
    out = engine.generate([[5, 6, 7]], SamplingParams(
        temperature=0, max_tokens=4, stop_token_ids=[first.token_ids[0], 10**9]))[0]
    assert out.finish_reason == "stop" and out.token_ids == [first.token_ids[0]]
