"""`engine serve`'s app (runtime.server) on the tiny llama engine, run in-process on uvicorn in
a thread: the official openai client (sync, async, streaming) gets the engine's greedy text,
every bad input gets a 4xx with OpenAI's error body and the server keeps answering, a client
that hangs up mid-stream frees its blocks, and API keys guard every route but /health."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx2 as httpx
import openai
import pytest

from llm_engine.runtime import AsyncEngine, Engine, SamplingParams
from llm_engine.runtime.cpu_info import cpu_info
from llm_engine.runtime.server import ServerConfig
from tests.server_harness import TINY_SERVER, LiveServer, free_port, metric, serve, tiny_engine

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def reference(engines) -> Engine:
    return tiny_engine(engines)


@pytest.fixture(scope="module")
def live(engines):
    yield from serve(engines, **TINY_SERVER)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def _greedy(engine: Engine, prompt, max_tokens: int = 8, **kw):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return engine.generate([prompt], params)[0]


# ---- the openai client ------------------------------------------------------------------------

def test_completion_matches_engine_generate(client, reference):
    r = client.completions.create(model="tiny", prompt="Hello, world!", max_tokens=8,
                                  temperature=0)
    ref = _greedy(reference, "Hello, world!")
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_token_id_prompt_and_streaming_with_usage(client, reference):
    ids = [5, 17, 33, 90, 120]
    ref = _greedy(reference, ids, max_tokens=10)
    stream = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == 5


def test_echo_with_logprobs_gives_prompt_logprobs(client, reference):
    prompt = "Paris is"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0,
                                  echo=True, logprobs=2)
    ref = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=4,
                                                      logprobs=2, prompt_logprobs=2))[0]
    c = r.choices[0]
    assert c.text == prompt + ref.text
    n_prompt = len(ref.prompt_token_ids)
    lp = c.logprobs
    assert len(lp.tokens) == n_prompt + 4 and lp.token_logprobs[0] is None
    want = [e[t] for e, t in zip(ref.prompt_logprobs[1:], ref.prompt_token_ids[1:])]
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(want, abs=1e-5)
    want_out = [e[t] for e, t in zip(ref.logprobs, ref.token_ids)]
    assert lp.token_logprobs[n_prompt:] == pytest.approx(want_out, abs=1e-5)
    assert all(len(t) >= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == c.text


def test_n_choices_and_stop_strings(client, reference):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6,
                                  temperature=1.0, seed=7, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 18  # the tiny model has no EOS: every choice runs out
    assert len({c.text for c in r.choices}) > 1  # seed + index: the choices differ
    ref = _greedy(reference, "Hello, world!", max_tokens=12)
    stop = ref.text[3:5]
    r = client.completions.create(model="tiny", prompt="Hello, world!", max_tokens=12,
                                  temperature=0, stop=[stop])
    assert r.choices[0].text == ref.text[:ref.text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_chat_sync_and_stream(client, reference):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = _greedy(reference, reference.apply_chat_template(messages))
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    content = r.choices[0].logprobs.content
    assert len(content) == 8 and all(len(t.top_logprobs) == 2 for t in content)
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)

    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, n=2, stream=True,
        stream_options={"include_usage": True}))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == ref.text
        assert mine[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 16


def test_async_client_concurrent(live, reference):
    async def main():
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        prompts = ["Hello, world!", "Paris is", "The cat"]
        rs = await asyncio.gather(*(client.completions.create(
            model="tiny", prompt=p, max_tokens=6, temperature=0) for p in prompts))
        await client.close()
        return prompts, rs

    prompts, rs = asyncio.run(main())
    for p, r in zip(prompts, rs):
        assert r.choices[0].text == _greedy(reference, p, max_tokens=6).text


# ---- bad input --------------------------------------------------------------------------------

BAD = [
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "hi", "n": 5}, 400, "n"),
    ({"prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2, 320]}, 400, "prompt"),
    ({"prompt": [1, -2]}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "hi", "stop": [1]}, 400, "stop"),
    ({"prompt": "hi", "bogus": 1}, 400, "bogus"),
    ({"prompt": 5}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "hi", "min_tokens": 20, "max_tokens": 4}, 400, "min_tokens"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_completion_input(live, body, status, param):
    r = httpx.post(live.url + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param


@pytest.mark.parametrize("body", [
    {"messages": []}, {"messages": "hi"}, {"messages": [{"content": "x"}]},
    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 9},
    {"messages": [{"role": "user", "content": 3}]},
])
def test_bad_chat_input(live, body):
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert "message" in r.json()["error"]


def test_malformed_oversized_and_unknown_routes(live, client):
    r = httpx.post(live.url + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():
        yield b'{"prompt": "'
        yield b"x" * 5000
        yield b'"}'

    r = httpx.post(live.url + "/v1/completions", content=chunked())
    assert r.status_code == 413
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(live.url + "/v1/completions", json=[1, 2])
    assert r.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", temperature=-3)
    # still answering
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert len(r.choices) == 1


# ---- disconnects, misc routes ------------------------------------------------------------------

async def _settled(ae: AsyncEngine, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        free, total, busy = await ae.run_sync(
            lambda e: (e.blocks.num_free_blocks, e.blocks.num_blocks, e.num_unfinished))
        if (free == total and busy == 0) or time.monotonic() > deadline:
            return free, total, busy
        await asyncio.sleep(0.02)


def test_disconnect_mid_stream_frees_blocks(live):
    ae = live.ae
    body = {"prompt": list(range(10, 40)), "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: {") for x in got)
        busy = asyncio.run(ae.run_sync(lambda e: e.num_unfinished))
        assert busy == 1
    # the response is closed: the server sees the disconnect and aborts
    free, total, busy = asyncio.run(_settled(ae))
    assert free == total and busy == 0
    assert httpx.get(live.url + "/health").status_code == 200


def test_disconnect_non_streaming_aborts(live):
    # The client hangs up once the engine has its request (polled, not timed: on the CPU fast
    # path 400 tokens of the tiny model take ~0.3 s), and the server aborts the request: it
    # ends with far fewer than its 400 tokens generated.
    def generated() -> int:
        return asyncio.run(live.ae.run_sync(lambda e: e.stats["generated_tokens"]))

    before = generated()
    body = json.dumps({"prompt": list(range(10, 40)), "max_tokens": 400, "temperature": 0,
                       "ignore_eos": True}).encode()
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while asyncio.run(live.ae.run_sync(lambda e: e.num_unfinished)) == 0:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.002)
    free, total, busy = asyncio.run(_settled(live.ae))
    assert free == total and busy == 0
    assert generated() - before < 200


def test_models_tokenize_detokenize_health(live, reference):
    r = httpx.get(live.url + "/v1/models").json()
    assert r["data"][0]["id"] == "tiny"
    r = httpx.post(live.url + "/tokenize", json={"prompt": "Hello, world!"}).json()
    assert r["tokens"] == reference.encode("Hello, world!")[1] and r["count"] == len(r["tokens"])
    back = httpx.post(live.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == "Hello, world!"
    messages = [{"role": "user", "content": "Hi"}]
    r = httpx.post(live.url + "/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == reference.encode(reference.apply_chat_template(messages))[1]
    assert httpx.post(live.url + "/detokenize", json={"tokens": [999]}).status_code == 400
    assert httpx.post(live.url + "/tokenize", json={"text": "x"}).status_code == 400
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


def test_request_log_line(live, caplog):
    caplog.set_level("INFO", logger="engine.server")
    httpx.post(live.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
    httpx.post(live.url + "/v1/completions", json={"prompt": "Hi", "n": 99})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "engine.server"]
    assert lines[0]["status"] == 200 and lines[0]["completion_tokens"] == 3
    assert lines[0]["finish_reason"] == "length" and lines[0]["latency_s"] >= 0
    assert lines[1]["status"] == 400


# ---- authentication ---------------------------------------------------------------------------

def test_api_keys(engines):
    ae = AsyncEngine(tiny_engine(engines))
    srv = LiveServer(ae, ServerConfig(model_name="tiny", api_keys=(KEY, "other")))
    try:
        url = srv.url
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/v1/models",
                         headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(url + "/tokenize", json={"prompt": "x"}).status_code == 401
        for k in (KEY, "other"):
            assert httpx.get(url + "/v1/models",
                             headers={"Authorization": f"Bearer {k}"}).status_code == 200
        good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices
        bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    finally:
        srv.stop()
        ae.shutdown()


def test_health_503_once_engine_stopped(engines):
    ae = AsyncEngine(tiny_engine(engines))
    srv = LiveServer(ae, ServerConfig())
    try:
        ae.shutdown()
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        srv.stop()


# ---- `engine serve` as a process --------------------------------------------------------------

def test_serve_command_graceful_sigterm(engines):
    """SIGTERM with requests in flight: a short one finishes, a long one is aborted at
    --shutdown-timeout, and the process exits 0."""
    import signal
    import subprocess
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_engine.builder.cli", "serve", str(engines("llama")), "--port",
         str(port), "--kv-cache-memory", "4MiB", "--block-size", "4", "--threads", "1",
         "--shutdown-timeout", "1", "--served-model-name", "tiny"],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "engine serve did not come up"
            time.sleep(0.1)
        results: dict[str, list[str]] = {}

        def stream(name: str, max_tokens: int) -> None:
            body = {"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "ignore_eos": True}
            lines: list[str] = []
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                    lines.extend(x for x in r.iter_lines() if x)
            except httpx.TransportError:
                lines.append("<closed>")
            results[name] = lines

        threads = [threading.Thread(target=stream, args=a) for a in (("short", 4),
                                                                     ("long", 500))]
        for t in threads:
            t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        rc = proc.wait(30)
        assert rc == 0, proc.stderr.read()
        assert time.monotonic() - start < 15
        for t in threads:
            t.join(10)
        assert results["short"][-1] == "data: [DONE]"
        assert results["long"]  # finished, or cut off at --shutdown-timeout
        log = [json.loads(x) for x in proc.stderr.read().splitlines() if x.startswith("{")]
        assert any(e["route"] == "/v1/completions" for e in log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_bench_against_the_server(live, tmp_path):
    """`engine bench --url` measures this server over HTTP with its streaming completions."""
    from click.testing import CliRunner

    from llm_engine.builder.cli import main

    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["bench", "--url", live.url, "--model", "tiny", "-c", "2",
                                       "-n", "4", "--input-tokens", "5", "--output-tokens", "6",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    level = json.loads(out.with_suffix(".json").read_text())["levels"][0]
    assert level["completed"] == 4 and level["errors"] == 0, level
    assert level["output_tokens"] == 4 * 6  # from the streamed usage
    assert level["ttft_p50_ms"] > 0 and level["itl_p50_ms"] is not None


def test_metrics(live, client):
    client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    assert metric(text, "llm_engine_requests_total", '{finish_reason="length"}') >= 1
    assert metric(text, "llm_engine_time_to_first_token_seconds_count") >= 1
    assert metric(text, "llm_engine_e2e_request_latency_seconds_count") >= 1
    assert metric(text, "llm_engine_request_queue_time_seconds_count") >= 1
    assert metric(text, "llm_engine_generation_tokens_total") >= 5
    assert metric(text, "llm_engine_prefix_cache_queries_total") >= 1
    isa = cpu_info().isa
    assert f'isa="{isa}"' in text and "llm_engine_backend_info{" in text
    for name in ("llm_engine_requests_running", "llm_engine_requests_waiting",
                 "llm_engine_preemptions_total", "llm_engine_prefix_cache_hits_total",
                 "llm_engine_inter_token_latency_seconds_count"):
        metric(text, name)
    # a stream cancelled mid-way: its blocks show up as used, then free again
    body = {"prompt": list(range(10, 40)), "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        [next(lines) for _ in range(4)]
        used = metric(httpx.get(live.url + "/metrics").text, "llm_engine_kv_cache_usage_ratio")
        assert used > 0
    asyncio.run(_settled(live.ae))
    text = httpx.get(live.url + "/metrics").text
    assert metric(text, "llm_engine_kv_cache_usage_ratio") == 0
    assert metric(text, "llm_engine_requests_total", '{finish_reason="abort"}') >= 1


@pytest.fixture
def strict(engines):
    """A server admitting one request at a time."""
    yield from serve(engines, max_concurrent_requests=1)


@pytest.fixture
def hasty(engines):
    """A server ending requests after 50 ms: far less than 480 tokens take."""
    yield from serve(engines, request_timeout=0.05)


def test_overload_gets_429_with_retry_after(strict):
    body = {"prompt": list(range(10, 40)), "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    barrier = threading.Barrier(6)

    def post(_):
        barrier.wait()
        return httpx.post(strict.url + "/v1/completions", json=body, timeout=60)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, range(6)))
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
    busy = next(a for a in answers if a.status_code == 429)
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "too_many_requests"
    asyncio.run(_settled(strict.ae))
    assert httpx.post(strict.url + "/v1/completions", json={**body, "max_tokens": 4}
                      ).status_code == 200


def test_request_timeout_ends_requests_with_an_error(hasty):
    body = {"prompt": list(range(10, 40)), "max_tokens": 480, "temperature": 0,
            "ignore_eos": True}
    start = time.monotonic()
    r = httpx.post(hasty.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - start < 5
    with httpx.stream("POST", hasty.url + "/v1/completions", json={**body, "stream": True},
                      timeout=30) as s:
        events = [x for x in s.iter_lines() if x.startswith("data: ")]
    assert "request_timeout" in events[-2] and events[-1] == "data: [DONE]"
    free, total, busy = asyncio.run(_settled(hasty.ae))
    assert free == total and busy == 0


@pytest.mark.parametrize("args,fragment", [
    (["--max-n", "0"], "--max-n must be >= 1"),
    (["--max-logprobs", "21"], "--max-logprobs must be in [0, 20]"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be >= 1"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0"),
    (["--max-concurrent-requests", "0"], "--max-concurrent-requests must be >= 1"),
    (["--request-timeout", "0"], "--request-timeout must be > 0"),
    (["--body-timeout", "0"], "--body-timeout must be > 0"),
    (["--template-timeout", "-1"], "--template-timeout must be > 0"),
    (["--api-key-file", "/nonexistent/keys.txt"], "cannot read --api-key-file"),
])
def test_serve_bad_options(engines, args, fragment):
    from click.testing import CliRunner

    from llm_engine.builder.cli import main
    from tests.cli_util import one_line_error

    one_line_error(CliRunner().invoke(main, ["serve", str(engines("llama")), *args]), fragment)

