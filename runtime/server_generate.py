"""Running one OpenAI request on the AsyncEngine: n choices at once, as whole responses or as
server-sent-event chunks. The wire format is in server_protocol; this module only drives the
engine and assembles the objects."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from llm_engine.runtime.async_engine import AsyncEngine
from llm_engine.runtime.output import Output
from llm_engine.runtime.server_protocol import (
    ApiError,
    GenRequest,
    chat_logprobs,
    choice_params,
    completion_logprobs,
)
from llm_engine.runtime.tool_calls import (
    StreamDelta,
    StreamingToolParser,
    parse_tool_calls,
    streaming_parser,
)

# OpenAI knows stop / length; the engine's abort and error are passed through as they are.


@dataclass
class Job:
    """A validated request with its prompt tokenized, ready to run."""

    req: GenRequest
    chat: bool
    model: str
    prompt_text: str  # for echo
    prompt_ids: list[int]
    decode: Callable[[int], str]  # one token id -> its text (logprobs' token strings)
    id: str = ""
    cache_salt: str | None = None  # the tenant's and the request's prefix-cache partition
    created: int = field(default_factory=lambda: int(time.time()))
    # filled in as the request runs, for the request log
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)  # finished choices' metrics

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def usage(self) -> dict[str, int]:
        p = len(self.prompt_ids)
        return {"prompt_tokens": p, "completion_tokens": self.completion_tokens,
                "total_tokens": p + self.completion_tokens}


def _raise_if_error(out: Output) -> None:
    if out.finish_reason == "error":
        # The engine could not run it at all (e.g. the prompt needs more KV cache than exists,
        # or its structured-output grammar failed to compile: "structured output: ...").
        raise ApiError(400, out.error or "the request failed in the engine")


async def _complete(ae: AsyncEngine, job: Job, index: int) -> Output:
    params = choice_params(job.req.params, index)
    try:
        return await ae.complete(job.prompt_ids, params, request_id=f"{job.id}-{index}",
                                 cache_salt=job.cache_salt)
    except ValueError as e:  # refused on submission (e.g. structured outputs, no tokenizer)
        raise ApiError(400, str(e)) from None


async def run_whole(ae: AsyncEngine, job: Job) -> dict[str, Any]:
    """The whole response object. Cancelling this aborts every choice still running."""
    outs = await asyncio.gather(*(_complete(ae, job, i) for i in range(job.req.n)))
    choices = []
    for i, out in enumerate(outs):
        _raise_if_error(out)
        job.completion_tokens += len(out.token_ids)
        job.finish_reasons.append(out.finish_reason or "")
        job.timings.append({**out.metrics, "tokens": len(out.token_ids)})
        choices.append(_whole_choice(job, i, out))
    return {"id": job.id, "object": job.object, "created": job.created, "model": job.model,
            "choices": choices, "usage": job.usage()}


def _whole_choice(job: Job, i: int, out: Output) -> dict[str, Any]:
    req = job.req
    if job.chat:
        lp = None
        if req.logprobs is not None:
            lp = chat_logprobs(job.decode, out.token_ids, out.logprobs or [], req.logprobs)
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        finish = out.finish_reason
        if req.tool_parser is not None:
            content, calls = parse_tool_calls(out.text, req.tool_parser, tool_max_calls(req))
            if calls:
                message = {"role": "assistant", "content": content,
                           "tool_calls": [c.to_openai() for c in calls]}
                finish = _tool_finish(finish)
        return {"index": i, "message": message, "logprobs": lp, "finish_reason": finish}
    text = (job.prompt_text + out.text) if req.echo else out.text
    lp = None
    if req.logprobs is not None:
        ids, entries = list(out.token_ids), list(out.logprobs or [])
        if req.echo:
            ids = list(job.prompt_ids) + ids
            entries = list(out.prompt_logprobs or [None] * len(job.prompt_ids)) + entries
        lp = completion_logprobs(job.decode, ids, entries, 0)
    return {"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}


def tool_max_calls(req: GenRequest) -> int | None:
    """At most one call per choice for parallel_tool_calls false (OpenAI's guarantee)."""
    return 1 if req.tools is not None and not req.tools.parallel_tool_calls else None


def _tool_finish(finish: str | None) -> str | None:
    """A reply that made tool calls ends with "tool_calls", unless it was cut short."""
    return "tool_calls" if finish in ("stop", None) else finish


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def run_stream(ae: AsyncEngine, job: Job) -> AsyncIterator[str]:
    """SSE chunks of all n choices as they come, then usage (if asked) and [DONE]. Closing or
    cancelling the iterator (client gone) cancels the choices, which aborts them."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            params = choice_params(job.req.params, i)
            async for out in ae.generate(job.prompt_ids, params, request_id=f"{job.id}-{i}",
                                         cache_salt=job.cache_salt):
                queue.put_nowait((i, out))
        except ValueError as e:  # refused on submission: the client's error
            queue.put_nowait((i, ApiError(400, str(e))))
        except Exception as e:  # handed to the consumer, which reports it in the stream
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(job.req.n)]
    offsets = [0] * job.req.n  # text offset per choice, for completions' text_offset
    counts = [0] * job.req.n  # output tokens per choice so far
    head = None  # the engine's first item, when it is awaited before the opening chunk
    parser = job.req.tool_parser if job.chat else None
    max_calls = tool_max_calls(job.req)
    parsers = [streaming_parser(parser, max_calls) if parser else None
               for _ in range(job.req.n)]
    try:
        if job.req.params.structured is not None:
            # Nothing is sent before the engine's first output: a grammar that fails to
            # compile (or a refused request) is then the route's 400, not an event in a 200.
            head = await queue.get()
            _raise_if_refused(job, head[1])
        for i in range(job.req.n):  # the opening chunk: chat's role, completions' echo
            first = _opening(job, i)
            if first is not None:
                yield sse(first)
                offsets[i] = len(job.prompt_text) if job.req.echo else 0
        done = 0
        while done < job.req.n:
            i, item = head if head is not None else await queue.get()
            head = None
            if isinstance(item, BaseException):
                message = item.message if isinstance(item, ApiError) else str(item)
                yield sse({"error": {"message": message, "type": "server_error",
                                     "param": None, "code": None}})
                job.finish_reasons.append("error")
                break
            if item.finish_reason == "error":
                yield sse(ApiError(400, item.error or "the request failed").body())
                job.finish_reasons.append("error")
                break
            counts[i] = len(item.token_ids)  # kept current, so an aborted stream logs them
            job.completion_tokens = sum(counts)
            chunk = _delta_chunk(job, i, item, offsets, parsers[i])
            if chunk is not None:
                yield sse(chunk)
            if item.finished:
                done += 1
                job.finish_reasons.append(item.finish_reason or "")
                job.timings.append({**item.metrics, "tokens": len(item.token_ids)})
        else:
            if job.req.include_usage:
                yield sse({"id": job.id, "object": _chunk_object(job), "created": job.created,
                           "model": job.model, "choices": [], "usage": job.usage()})
        yield "data: [DONE]\n\n"
    finally:
        # choices that never finished were aborted (client gone, shutdown): say so in the log
        job.finish_reasons += ["abort"] * (job.req.n - len(job.finish_reasons))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _raise_if_refused(job: Job, item: Output | BaseException) -> None:
    """A choice's first item, if it ends the request before any token, as an ApiError."""
    if isinstance(item, ApiError):
        job.finish_reasons.append("error")
        raise item
    if isinstance(item, Output) and item.finish_reason == "error" and not item.token_ids:
        job.finish_reasons.append("error")
        _raise_if_error(item)


def _chunk_object(job: Job) -> str:
    return "chat.completion.chunk" if job.chat else "text_completion"


def _chunk(job: Job, choice: dict[str, Any]) -> dict[str, Any]:
    obj = {"id": job.id, "object": _chunk_object(job), "created": job.created,
           "model": job.model, "choices": [choice]}
    if job.req.include_usage:
        obj["usage"] = None  # OpenAI: only the final chunk carries usage
    return obj


def _opening(job: Job, i: int) -> dict[str, Any] | None:
    if job.chat:
        return _chunk(job, {"index": i, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None})
    if job.req.echo:
        return _chunk(job, {"index": i, "text": job.prompt_text, "logprobs": None,
                            "finish_reason": None})
    return None


def _tool_delta(parser: StreamingToolParser, out: Output) -> tuple[dict[str, Any], str | None]:
    """A chat delta of content and tool-call deltas from the parser, and the finish reason."""
    got = parser.feed(out.delta_text) if out.delta_text else StreamDelta()
    finish = out.finish_reason
    if out.finished:
        end = parser.finish()
        got = StreamDelta(got.content + end.content, got.tool_calls + end.tool_calls)
        if parser.result()[1]:
            finish = _tool_finish(finish)
    delta: dict[str, Any] = {}
    if got.content:
        delta["content"] = got.content
    if got.tool_calls:
        delta["tool_calls"] = [d.to_openai() for d in got.tool_calls]
    return delta, finish


def _delta_chunk(job: Job, i: int, out: Output, offsets: list[int],
                 parser: StreamingToolParser | None = None) -> dict[str, Any] | None:
    ids = out.delta_token_ids
    if not out.delta_text and not ids and not out.finished:
        return None
    req = job.req
    entries = (out.logprobs or [])[len(out.token_ids) - len(ids):] if ids else []
    if job.chat:
        lp = None
        if req.logprobs is not None:
            lp = chat_logprobs(job.decode, ids, entries, req.logprobs)
        if parser is not None:
            delta, finish = _tool_delta(parser, out)
            if not delta and not out.finished and lp is None:
                return None  # text held back: it may begin a call
        else:
            delta = {"content": out.delta_text} if out.delta_text or not out.finished else {}
            finish = out.finish_reason
        choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
    else:
        lp = None
        if req.logprobs is not None:
            lp = completion_logprobs(job.decode, ids, entries, offsets[i])
        choice = {"index": i, "text": out.delta_text, "logprobs": lp,
                  "finish_reason": out.finish_reason}
    offsets[i] += len(out.delta_text)
    return _chunk(job, choice)
