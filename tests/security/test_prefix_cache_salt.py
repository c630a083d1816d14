"""The prefix cache as a side channel: a client watching /metrics (or its own time to first
token) could learn whether another user had sent a given prefix. Prefix blocks are now shared
only among requests of one partition: the API key's (when keys are set), narrowed by a
request's `cache_salt` (vLLM's field). What a client can observe about hits is then about its
own partition only."""

from __future__ import annotations

import re

import httpx2 as httpx
import pytest

from llm_engine.runtime.block_manager import BlockManager

PROMPT = list(range(10, 30))  # five full blocks of 4


def test_blocks_are_shared_only_within_a_salt():
    bm = BlockManager(64, 4)
    assert bm.allocate_prompt("a", PROMPT, len(PROMPT), salt=b"alice") == 0
    bm.commit("a", PROMPT, len(PROMPT))
    assert bm.allocate_prompt("b", PROMPT, len(PROMPT), salt=b"bob") == 0  # another tenant
    assert bm.allocate_prompt("c", PROMPT, len(PROMPT)) == 0  # no salt: another partition too
    assert bm.allocate_prompt("d", PROMPT, len(PROMPT), salt=b"alice") == 16  # same: 4 blocks
    bm.fork("d", "e")  # a fork continues its parent's chain
    assert bm.allocate_slots("e", 24)
    bm.commit("e", [*PROMPT, 1, 2, 3, 4], 24)
    assert bm.allocate_prompt("f", [*PROMPT, 1, 2, 3, 4, 5], 25, salt=b"alice") == 24


@pytest.fixture(scope="module")
def live(serve_tiny):
    return serve_tiny(api_keys=("key-alice", "key-bob"))


def _hits(live, key: str) -> float:
    text = httpx.get(live.url + "/metrics", headers={"authorization": f"Bearer {key}"}).text
    return float(re.search(r"^llm_engine_prefix_cache_hits_total (\S+)$", text, re.M).group(1))


def _complete(live, key: str, **extra) -> None:
    r = httpx.post(live.url + "/v1/completions", headers={"authorization": f"Bearer {key}"},
                   json={"prompt": PROMPT, "max_tokens": 1, **extra}, timeout=30)
    assert r.status_code == 200, r.text


def test_one_tenant_cannot_see_anothers_prefix(live):
    _complete(live, "key-alice")
    before = _hits(live, "key-bob")
    _complete(live, "key-bob")  # the same prompt from another key: no hit to observe
    assert _hits(live, "key-bob") == before
    _complete(live, "key-alice")  # the same key again: its own prefix is reused
    assert _hits(live, "key-alice") > before


def test_cache_salt_partitions_within_a_key(live):
    _complete(live, "key-alice", cache_salt="session-1")
    before = _hits(live, "key-alice")
    _complete(live, "key-alice", cache_salt="session-2")
    assert _hits(live, "key-alice") == before
    _complete(live, "key-alice", cache_salt="session-1")
    assert _hits(live, "key-alice") > before


def test_cache_salt_is_validated(live):
    r = httpx.post(live.url + "/v1/completions", headers={"authorization": "Bearer key-bob"},
                   json={"prompt": "hi", "cache_salt": "x" * 300}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
