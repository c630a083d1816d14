"""`engine bench`: load-test an engine in-process or any OpenAI-compatible server over HTTP.

Both targets get the same load: N requests at a fixed concurrency, or arriving at a fixed or
Poisson rate (each request starts at its arrival time, however many are in flight). Every
request streams, so each token's arrival is timed on the client: TTFT (request start to first
token), ITL (gaps between streamed chunks), TPOT ((e2e - TTFT) / (tokens - 1)) and end-to-end
latency, with p50/p95/p99, requests/s and output tokens/s over the run's wall time. A request
that fails is counted, never dropped. Prompts are synthetic (seeded random words, about
--input-tokens tokens) or read from a file (one prompt per line, or JSONL with "prompt").

The HTTP client is a small HTTP/1.1 reader over asyncio streams (chunked or sized bodies,
server-sent events), so measuring a peer needs nothing beyond the standard library.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Common English words (about one token each), for synthetic prompts.
_WORD_TEXT = """the of and to in is that for it as was with be by on not he this are or his from
at which but have an they you were her she there one all we their can has been if more when
will would who so no time people year way day man thing woman life child world school state
family student group country problem hand part place case week company system program question
work government number night point home water room mother area money story fact month lot right
study book eye job word business issue side kind head house service friend father power hour
game line end member law car city"""
WORDS = _WORD_TEXT.split()


@dataclass
class Result:
    ok: bool
    start: float  # seconds since the run started
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None
    _last: float | None = field(default=None, repr=False)

    def arrived(self, start: float) -> None:
        """Output streamed in now: the first arrival sets TTFT, later ones add an ITL gap."""
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - start
        elif self._last is not None:
            self.itl.append(now - self._last)
        self._last = now


@dataclass
class LoadSpec:
    num_requests: int
    concurrency: int | None = None  # fixed concurrency, or
    rate: float | None = None  # requests/s
    poisson: bool = True  # exponential inter-arrival gaps at `rate` (else evenly spaced)
    seed: int = 0


# ---- prompts -----------------------------------------------------------------------------
def synthetic_prompts(n: int, input_tokens: int, seed: int = 0) -> list[str]:
    """Seeded random English words; common words are about one token each."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(input_tokens)) for _ in range(n)]


def file_prompts(path: Path, n: int) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    prompts = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from e
            if not isinstance(obj.get("prompt"), str):
                raise ValueError(f'{path}:{i + 1}: needs a "prompt" string')
            prompts.append(obj["prompt"])
        else:
            prompts.append(line)
    return [prompts[i % len(prompts)] for i in range(n)]


# ---- the load generator -------------------------------------------------------------------
Send = Callable[[str, float, Result], Awaitable[None]]


async def run_load(prompts: Sequence[str], spec: LoadSpec, send: Send,
                   on_done: Callable[[], None] | None = None) -> tuple[list[Result], float]:
    """Run every prompt through `send` under `spec`; returns the results and the wall time."""
    t0 = time.perf_counter()
    results = [Result(ok=False, start=0.0) for _ in prompts]

    async def one(i: int) -> None:
        r = results[i]
        r.start = time.perf_counter() - t0
        try:
            await send(prompts[i], t0, r)
            r.ok = r.error is None
        except Exception as e:  # a failed request is a result, never a crash of the run
            r.ok, r.error = False, f"{type(e).__name__}: {e}"
        if on_done is not None:
            on_done()

    if spec.concurrency is not None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(prompts)):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                await one(queue.get_nowait())

        await asyncio.gather(*(worker() for _ in range(min(spec.concurrency, len(prompts)))))
    else:
        assert spec.rate is not None and spec.rate > 0
        rng = random.Random(spec.seed)
        tasks, at = [], 0.0
        for i in range(len(prompts)):
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
            at += rng.expovariate(spec.rate) if spec.poisson else 1.0 / spec.rate
        await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.e2e is not None and r.ttft is not None and r.output_tokens > 1]
    stats: dict[str, Any] = {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3) if wall else None,
        "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / wall, 2) if wall else None,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
    }
    series = {"ttft": [r.ttft for r in ok if r.ttft is not None], "tpot": tpot,
              "itl": [x for r in ok for x in r.itl], "e2e": [r.e2e for r in ok if r.e2e]}
    for name, values in series.items():
        for q in (0.5, 0.95, 0.99):
            v = _pct(values, q)
            # µs resolution: a tiny engine's per-token gaps are below 10 µs
            stats[f"{name}_p{int(q * 100)}_ms"] = None if v is None else round(1000 * v, 3)
    errors = sorted({r.error for r in results if r.error})
    if errors:
        stats["error_examples"] = errors[:5]
    return stats


# ---- targets -----------------------------------------------------------------------------
def engine_sender(async_engine: Any, max_tokens: int) -> Send:
    """Requests into an AsyncEngine in this process."""
    from llm_engine.runtime.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def send(prompt: str, t0: float, r: Result) -> None:
        start = time.perf_counter()
        async for out in async_engine.generate(prompt, params):
            if out.delta_token_ids:
                r.arrived(start)
            if out.finished:
                r.prompt_tokens = len(out.prompt_token_ids)
                r.output_tokens = len(out.token_ids)
                if out.finish_reason == "error":
                    r.error = out.error or "error"
        r.e2e = time.perf_counter() - start

    return send


async def _http_stream(url: str, body: dict[str, Any], headers: dict[str, str]
                       ) -> AsyncIterator[str | tuple[int, str]]:
    """POST `body` as JSON; yields (status, text) for a non-200 answer, else each
    server-sent event's data."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"{url}: only http:// URLs are supported")
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    try:
        data = json.dumps(body).encode()
        head = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}",
                "Content-Type: application/json", f"Content-Length: {len(data)}",
                "Accept: text/event-stream", "Connection: close",
                *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        fields: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            fields[k.strip().lower()] = v.strip()
        chunked = fields.get("transfer-encoding", "").lower() == "chunked"

        async def body_chunks() -> AsyncIterator[bytes]:
            if not chunked:
                n = fields.get("content-length")
                yield await (reader.readexactly(int(n)) if n is not None else reader.read())
                return
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    return
                yield await reader.readexactly(size)
                await reader.readline()

        if status != 200:
            text = b"".join([c async for c in body_chunks()]).decode(errors="replace")
            yield status, text
            return
        buf = b""
        async for chunk in body_chunks():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.decode().splitlines():
                    if line.startswith("data:"):
                        yield line[5:].strip()
    finally:
        writer.close()


def http_sender(base_url: str, model: str | None, max_tokens: int,
                api_key: str | None = None) -> Send:
    """Streaming /v1/completions requests to an OpenAI-compatible server (ours, vLLM, ...)."""
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def send(prompt: str, t0: float, r: Result) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        start = time.perf_counter()
        chunks = 0
        async for item in _http_stream(url, body, headers):
            if isinstance(item, tuple):
                r.error = f"HTTP {item[0]}: {item[1][:200]}"
                return
            if item == "[DONE]":
                break
            event = json.loads(item)
            if "error" in event:
                r.error = str(event["error"])[:200]
                return
            if event.get("usage"):
                r.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                r.output_tokens = event["usage"].get("completion_tokens", 0)
            if any(c.get("text") for c in event.get("choices") or []):
                chunks += 1
                r.arrived(start)
        r.e2e = time.perf_counter() - start
        if not r.output_tokens:  # a server without usage in streams: count chunks
            r.output_tokens = chunks

    return send


# Called before a level; what it returns is called after it, and its dict joins the level's row.
Probe = Callable[[], Callable[[], dict[str, Any]]]


def speculation_probe(engine: Any) -> Probe | None:
    """The speculation of an in-process engine per level: the change of its SpecStats over
    the level (the engine's counters run for its whole life); None when speculation is off."""
    speculator = getattr(engine, "speculator", None)
    if speculator is None:
        return None

    def start() -> Callable[[], dict[str, Any]]:
        before = replace(speculator.stats)  # a copy: the engine thread keeps counting

        def end() -> dict[str, Any]:
            now = speculator.stats
            delta = replace(now, **{f.name: getattr(now, f.name) - getattr(before, f.name)
                                    for f in fields(now)})
            return {"speculative": delta.to_json()}

        return end

    return start


# ---- a sweep -----------------------------------------------------------------------------
async def sweep(send: Send, prompts: Sequence[str], levels: list[LoadSpec],
                progress: Callable[[str, int], Callable[[], None]] | None = None,
                probe: Probe | None = None) -> list[dict[str, Any]]:
    rows = []
    for spec in levels:
        label = f"concurrency {spec.concurrency}" if spec.concurrency else \
            f"rate {spec.rate}/s"
        tick = progress(label, spec.num_requests) if progress else None
        end = probe() if probe is not None else None
        results, wall = await run_load(prompts[:spec.num_requests], spec, send, tick)
        rows.append({"load": {k: v for k, v in asdict(spec).items() if v is not None},
                     **summarize(results, wall), **(end() if end is not None else {})})
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Latency against load (PNG); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = [r["load"].get("concurrency") or r["load"].get("rate") for r in rows]
    xlabel = "concurrent requests" if rows and rows[0]["load"].get("concurrency") \
        else "request rate (req/s)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("ttft_p50_ms", "o-"), ("ttft_p99_ms", "o--"), ("tpot_p50_ms", "s-"),
                       ("tpot_p99_ms", "s--"), ("e2e_p50_ms", "^-")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax1.plot(xs, ys, style, label=key.removesuffix("_ms").replace("_", " "))
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("ms")
    ax1.set_yscale("log")
    if ax1.get_legend_handles_labels()[0]:  # nothing to draw when every request failed
        ax1.legend(fontsize=8)
    ax1.set_title("latency")
    ax2.plot(xs, [r["output_tokens_per_s"] for r in rows], "o-")
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("output tokens/s")
    ax2.set_title("throughput")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
