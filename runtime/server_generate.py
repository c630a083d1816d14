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
        # The engine could not run it at all (e.g. the prompt needs more KV cache than exists).
        raise ApiError(400, out.error or "the request failed in the engine")


async def _complete(ae: AsyncEngine, job: Job, index: int) -> Output:
    params = choice_params(job.req.params, index)
    return await ae.complete(job.prompt_ids, params, request_id=f"{job.id}-{index}",
                             cache_salt=job.cache_salt)


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
        return {"index": i, "message": {"role": "assistant", "content": out.text},
                "logprobs": lp, "finish_reason": out.finish_reason}
    text = (job.prompt_text + out.text) if req.echo else out.text
    lp = None
    if req.logprobs is not None:
        ids, entries = list(out.token_ids), list(out.logprobs or [])
        if req.echo:
            ids = list(job.prompt_ids) + ids
            entries = list(out.prompt_logprobs or [None] * len(job.prompt_ids)) + entries
        lp = completion_logprobs(job.decode, ids, entries, 0)
    return {"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}


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
        except Exception as e:  # handed to the consumer, which reports it in the stream
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(job.req.n)]
    offsets = [0] * job.req.n  # text offset per choice, for completions' text_offset
    counts = [0] * job.req.n  # output tokens per choice so far
    try:
        for i in range(job.req.n):  # the opening chunk: chat's role, completions' echo
            first = _opening(job, i)
            if first is not None:
                yield sse(first)
                offsets[i] = len(job.prompt_text) if job.req.echo else 0
        done = 0
        while done < job.req.n:
            i, item = await queue.get()
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
            chunk = _delta_chunk(job, i, item, offsets)
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


def _delta_chunk(job: Job, i: int, out: Output, offsets: list[int]) -> dict[str, Any] | None:
    ids = out.delta_token_ids
    if not out.delta_text and not ids and not out.finished:
        return None
    req = job.req
    entries = (out.logprobs or [])[len(out.token_ids) - len(ids):] if ids else []
    if job.chat:
        lp = None
        if req.logprobs is not None:
            lp = chat_logprobs(job.decode, ids, entries, req.logprobs)
        delta = {"content": out.delta_text} if out.delta_text or not out.finished else {}
        choice = {"index": i, "delta": delta, "logprobs": lp,
                  "finish_reason": out.finish_reason}
    else:
        lp = None
        if req.logprobs is not None:
            lp = completion_logprobs(job.decode, ids, entries, offsets[i])
        choice = {"index": i, "text": out.delta_text, "logprobs": lp,
                  "finish_reason": out.finish_reason}
    offsets[i] += len(out.delta_text)
    return _chunk(job, choice)
