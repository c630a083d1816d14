"""The legacy scoring call of /v1/completions (`echo: true, max_tokens: 0, logprobs: N`, what
lm-evaluation-harness's loglikelihood sends): the prompt's logprobs and nothing generated, equal
to the engine's prompt logprobs and to HF's log-softmax of the tiny llama; echo with
max_tokens > 0 scores prompt and completion; what cannot be answered is a clear 400."""

from __future__ import annotations

import httpx2 as httpx
import openai
import pytest
import torch

from llm_engine.runtime import Engine, SamplingParams
from tests.server_harness import TINY_SERVER, serve, tiny_engine

PROMPT_IDS = [25, 17, 33, 90, 120, 70, 250, 64, 77, 41, 199]  # no special tokens


@pytest.fixture(scope="module")
def reference(engines) -> Engine:
    return tiny_engine(engines)


@pytest.fixture(scope="module")
def live(engines):
    yield from serve(engines, **TINY_SERVER)


def _hf_prompt_logprobs(hf, ids: list[int]) -> list[float]:
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def _score(live, prompt, logprobs: int | None = 2, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, **extra}
    if logprobs is not None:
        body["logprobs"] = logprobs
    return httpx.post(live.url + "/v1/completions", json=body, timeout=60)


def test_engine_max_tokens_0_scores_the_prompt_only(reference, checkpoints):
    _, hf = checkpoints("llama")
    # The prompt's blocks are in the prefix cache first: scoring must still compute every row.
    reference.generate([PROMPT_IDS], SamplingParams(temperature=0, max_tokens=2))
    before = reference.stats["generated_tokens"]
    out = reference.generate([PROMPT_IDS], SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"
    assert reference.stats["generated_tokens"] == before  # nothing sampled
    assert len(out.prompt_logprobs) == len(PROMPT_IDS) and out.prompt_logprobs[0] is None
    got = [e[t] for e, t in zip(out.prompt_logprobs[1:], PROMPT_IDS[1:])]
    assert got == pytest.approx(_hf_prompt_logprobs(hf, PROMPT_IDS), abs=1e-4)
    assert not reference.has_unfinished()
    with pytest.raises(ValueError, match="max_tokens must be >= 1 or None"):
        SamplingParams(max_tokens=0)  # nothing to return without prompt logprobs


def test_scoring_call_matches_engine_and_hf(live, reference, checkpoints):
    _, hf = checkpoints("llama")
    r = _score(live, PROMPT_IDS, logprobs=3)
    assert r.status_code == 200, r.text
    body = r.json()
    c = body["choices"][0]
    ref = reference.generate([PROMPT_IDS], SamplingParams(temperature=0, max_tokens=1,
                                                          prompt_logprobs=3))[0]
    text = reference.tokenizer.decode(PROMPT_IDS)
    assert c["text"] == text and c["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(PROMPT_IDS), "completion_tokens": 0,
                             "total_tokens": len(PROMPT_IDS)}
    lp = c["logprobs"]
    n = len(PROMPT_IDS)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert len(lp["text_offset"]) == n and lp["text_offset"][0] == 0
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [e[t] for e, t in zip(ref.prompt_logprobs[1:], PROMPT_IDS[1:])]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    assert lp["token_logprobs"][1:] == pytest.approx(_hf_prompt_logprobs(hf, PROMPT_IDS),
                                                     abs=1e-4)
    # top-3 plus the prompt's own token where it is not among them (keyed by token text,
    # so tokens that decode alike share a key)
    assert all(1 <= len(t) <= 4 for t in lp["top_logprobs"][1:])
    assert all(3 <= len(e) <= 4 for e in ref.prompt_logprobs[1:])
    assert "".join(lp["tokens"]) == text


def test_scoring_call_through_openai_client(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    prompt = "The capital of France is Paris"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                  logprobs=1)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(c.logprobs.tokens)
    assert c.logprobs.token_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in c.logprobs.token_logprobs[1:])
    assert "".join(c.logprobs.tokens) == prompt


def test_echo_with_max_tokens_scores_prompt_and_completion(live, reference):
    scored = _score(live, PROMPT_IDS).json()["choices"][0]
    r = httpx.post(live.url + "/v1/completions", timeout=60, json={
        "prompt": PROMPT_IDS, "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    c = body["choices"][0]
    ref = reference.generate([PROMPT_IDS], SamplingParams(temperature=0, max_tokens=3,
                                                          logprobs=2))[0]
    n = len(PROMPT_IDS)
    assert c["text"] == scored["text"] + ref.text
    assert body["usage"]["completion_tokens"] == 3
    lp = c["logprobs"]
    assert len(lp["tokens"]) == n + 3
    assert lp["token_logprobs"][:n] == pytest.approx(scored["logprobs"]["token_logprobs"],
                                                     abs=1e-5)
    want = [e[t] for e, t in zip(ref.logprobs, ref.token_ids)]
    assert lp["token_logprobs"][n:] == pytest.approx(want, abs=1e-5)


def test_echo_max_tokens_0_without_logprobs_returns_the_prompt(live, reference):
    r = _score(live, PROMPT_IDS, logprobs=None)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["text"] == reference.tokenizer.decode(PROMPT_IDS) and c["logprobs"] is None
    assert r.json()["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("body,param,fragment", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "echo: true"),
    ({"prompt": "hi", "max_tokens": 0, "logprobs": 1}, "max_tokens", "echo: true"),
    ({"prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True},
     "stream", "stream: false"),
    ({"prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 6}, "logprobs", "[0, 5]"),
    ({"prompt": "hi", "max_tokens": -1, "echo": True, "logprobs": 1}, "max_tokens", ">= 1"),
])
def test_scoring_400s(live, body, param, fragment):
    r = httpx.post(live.url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err
    assert httpx.get(live.url + "/health").status_code == 200
