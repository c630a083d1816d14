"""Chat templates run per request, and a template with nested loops over a long conversation
(or one built to be slow) used to run on the engine thread: one chat request froze every other
client while /health still said 200. Renders now run off the engine thread under a time and
output budget; over budget is a 400 for that request only."""

from __future__ import annotations

import threading
import time

import httpx2 as httpx
import pytest

from llm_engine.runtime.chat_template import RenderBudget
from llm_engine.runtime.tokenizer_errors import TokenizerError
from tests.server_harness import tiny_engine

# Quadratic and silent: for each message, a walk over the whole conversation.
SLOW = ("{% for m in messages %}{% for n in messages %}{% if n.role == 'x' %}!{% endif %}"
        "{% endfor %}{% endfor %}{{ messages[-1].content }}")
LOUD = "{% for m in messages %}{% for n in messages %}{{ n.content }}{% endfor %}{% endfor %}"
SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def _conversation(n: int) -> list[dict]:
    return [{"role": "user", "content": f"message {i}"} for i in range(n)]


@pytest.fixture
def tokenizer(engines):
    return tiny_engine(engines).tokenizer


@pytest.mark.parametrize("template", [SLOW, SPIN], ids=["nested-messages", "nested-range"])
def test_time_budget_ends_a_slow_render(tokenizer, template):
    start = time.monotonic()
    with pytest.raises(TokenizerError, match="budget"):
        tokenizer.apply_chat_template(_conversation(5000), chat_template=template,
                                      budget=RenderBudget(seconds=0.3))
    assert time.monotonic() - start < 5


def test_output_budget_ends_a_huge_render(tokenizer):
    with pytest.raises(TokenizerError, match="characters"):
        tokenizer.apply_chat_template(_conversation(3000), chat_template=LOUD,
                                      budget=RenderBudget(seconds=60, max_chars=1 << 20))


def test_within_budget_the_render_is_unchanged(tokenizer):
    messages = _conversation(3)
    assert tokenizer.apply_chat_template(messages, budget=RenderBudget()) == \
        tokenizer.apply_chat_template(messages)


@pytest.fixture(scope="module")
def live(engines, serve_tiny):
    engine = tiny_engine(engines)
    engine.tokenizer.chat_template = SLOW
    return serve_tiny(engine, template_timeout=1.5)


def test_a_slow_template_costs_only_its_own_request(live):
    done: dict[str, float] = {}

    def heavy() -> None:
        r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                       json={"messages": _conversation(20000), "max_tokens": 2})
        done["heavy"] = time.monotonic()
        done["heavy_status"] = r.status_code
        done["heavy_message"] = r.json()["error"]["message"]

    t = threading.Thread(target=heavy)
    t.start()
    time.sleep(0.3)  # the heavy render is under way
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                   timeout=60)
    done["light"] = time.monotonic()
    t.join(60)
    assert r.status_code == 200
    assert done["heavy_status"] == 400 and "budget" in done["heavy_message"]
    assert done["light"] < done["heavy"]  # served while the render ran, not after it
