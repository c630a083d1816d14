"""`engine serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over AsyncEngine.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize,
POST /detokenize, GET /metrics, GET /health. Every error is OpenAI's body
{"error": {"message", "type", "param", "code"}}; bad input is a 4xx before anything is queued,
never a 500. `create_app` builds the app for any AsyncEngine (tests run it in-process);
`serve` runs it until SIGTERM/SIGINT and then shuts the engine down.

The routes are module-level functions on `router`; what they share (the engine, the options,
the metrics and the count of admitted requests) is the app's ServerState.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Container
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_engine.runtime.async_engine import AsyncEngine, EngineDeadError
from llm_engine.runtime.chat_template import RenderBudget
from llm_engine.runtime.sampling_params import MAX_STOP_STRINGS
from llm_engine.runtime.server_generate import Job, run_stream, run_whole, sse
from llm_engine.runtime.server_guard import Guard, bearer, error_response, json_body
from llm_engine.runtime.server_metrics import ServerMetrics
from llm_engine.runtime.server_protocol import ApiError, GenRequest, Limits
from llm_engine.runtime.server_requests import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    validate,
)
from llm_engine.runtime.structured.spec import StructuredSpec
from llm_engine.runtime.tool_calls import (
    PARSERS,
    chat_template_inputs,
    constrained_grammar,
    detect_mistral_style,
    detect_parser,
    single_call_stop,
)

log = logging.getLogger("engine.server")


@dataclass
class ServerConfig:
    model_name: str = "model"
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_n: int = 8
    max_logprobs: int = 20
    max_body_bytes: int = 1 << 20
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers at all
    shutdown_timeout: float = 30.0  # seconds in-flight requests get on SIGTERM
    max_concurrent_requests: int | None = None  # above it: 429 with Retry-After
    request_timeout: float | None = None  # seconds a request may take before it is ended
    body_timeout: float = 30.0  # seconds a client has to send its body (then 408)
    template_timeout: float = 2.0  # seconds a chat-template render may take (then 400)
    tool_call_parser: str | None = None  # hermes, llama3 or mistral; None: from the template
    limits: Limits = field(init=False)

    def __post_init__(self) -> None:
        self.limits = Limits(self.max_n, self.max_logprobs)


# The markers of each tool-call format. Those that are special tokens in the engine's tokenizer
# are kept when decoding (the parser must see them); those that are added tokens at all (Qwen's
# <tool_call> is one, not special) are matched as tokens by the grammar.
_PARSER_MARKERS = {"hermes": {"<tool_call>", "</tool_call>"}, "llama3": {"<|python_tag|>"},
                   "mistral": {"[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"}}
_ALL_MARKERS = sorted(set().union(*_PARSER_MARKERS.values()))


def _markers_among(tok: Any, ids: Container[int]) -> dict[str, int]:
    """The tool-call markers that are one token of `tok` with its id in `ids`."""
    found = {}
    for marker in _ALL_MARKERS:
        i = tok.backend.token_to_id(marker)
        if i is not None and i in ids:
            found[marker] = i
    return found


def _special_markers(tok: Any) -> dict[str, int]:
    """Markers that decoding with skip_special_tokens would drop."""
    return _markers_among(tok, tok.skipped_ids) if tok is not None else {}


def _marker_tokens(tok: Any) -> dict[str, int]:
    """Markers that are one added token. llguidance takes every added token for a special one,
    so a grammar that wrote such a marker as text would force that token and then reject it:
    the grammar must name the token instead."""
    return _markers_among(tok, tok.backend.get_added_tokens_decoder()) if tok is not None \
        else {}


def _decoder(engine: Any) -> Callable[[int], str]:
    tok = engine.tokenizer
    if tok is None:
        return lambda t: f"token_id:{t}"
    return lambda t: tok.decode([t], skip_special_tokens=False)


@dataclass
class ServerState:
    """What the routes share: the engine, the options, the metrics, and how many generation
    requests are admitted and not yet ended (for --max-concurrent-requests)."""

    ae: AsyncEngine
    config: ServerConfig
    metrics: ServerMetrics = field(init=False)
    decode: Callable[[int], str] = field(init=False)
    tool_parser: str | None = field(init=False)  # the tool-call format; None: not known
    tool_markers: dict[str, int] = field(init=False)  # markers that are special tokens
    tool_tokens: dict[str, int] = field(init=False)  # markers that are added tokens (grammar)
    mistral_style: str = field(init=False)  # Mistral's call format: "list" or "args" (v11)
    inflight: int = 0

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.engine)
        self.decode = _decoder(self.engine)
        tok = self.engine.tokenizer
        self.tool_parser = detect_parser(tok.chat_template if tok is not None else None,
                                         self.config.tool_call_parser)
        self.tool_markers = _special_markers(tok)
        self.tool_tokens = _marker_tokens(tok)
        self.mistral_style = detect_mistral_style(
            tok.chat_template if tok is not None else None, self.tool_tokens)

    @property
    def engine(self) -> Any:
        return self.ae.engine

    def admit(self) -> None:
        """Take a slot, or 429. Synchronous, so nothing runs between the check and the
        increment: clients that send headers, stall, then send bodies each hold a slot while
        they stall, instead of all passing the check first."""
        limit = self.config.max_concurrent_requests
        if limit is not None and self.inflight >= limit:
            raise ApiError(429, f"the server is at its limit of {limit} concurrent requests; "
                                "retry shortly", type_="rate_limit_error",
                           code="too_many_requests")
        self.inflight += 1

    async def read_request(self, request: Request, chat: bool) -> GenRequest:
        """The body, within --body-timeout (so a stalled client gives its slot back), checked
        by server_guard and then validated."""
        try:
            body = await asyncio.wait_for(json_body(request, self.config.max_body_bytes),
                                          self.config.body_timeout)
        except TimeoutError:
            raise ApiError(408, "the request body did not arrive within the server's "
                                f"--body-timeout of {self.config.body_timeout:g} s",
                           code="request_timeout") from None
        model = ChatRequest if chat else CompletionRequest
        return validate(model, body, limits=self.config.limits).to_request()

    async def render_chat(self, messages: list[dict[str, Any]],
                          tools: list[dict[str, Any]] | None = None) -> str:
        """The chat template rendered off the engine thread (which every request shares), in
        a worker thread under a time and output budget: a slow template or a conversation
        built to make it slow costs its own request a 400, not everyone a stall."""
        budget = RenderBudget(seconds=self.config.template_timeout)
        kw = {"tools": tools} if tools is not None else {}
        return await asyncio.to_thread(self.engine.apply_chat_template, messages, budget=budget,
                                       **kw)

    def prepare_tools(self, req: GenRequest) -> tuple[list[dict[str, Any]],
                                                      list[dict[str, Any]] | None]:
        """A chat request's messages and `tools` template variable; with tools, the parser
        that reads the reply and (tool_choice "required" or a named function) the grammar
        that forces a call, both set on `req`."""
        messages, config = req.messages or [], req.tools
        has_tools = config is not None and bool(config.tools)
        if not has_tools and not any(
                m.get("tool_calls") is not None or m.get("role") == "tool" for m in messages):
            return messages, None
        parser = self.tool_parser
        if has_tools and config.parse_calls and parser is None:
            raise ApiError(400, "the engine's chat template has no tool-call format this "
                                "server knows; start `engine serve` with --tool-call-parser "
                                f"({', '.join(PARSERS)}) to use tools", param="tools")
        messages, tools = chat_template_inputs(messages, config, parser)
        if has_tools and config.parse_calls:
            req.tool_parser = parser
            changes: dict[str, Any] = {}
            if config.constrained:
                grammar = constrained_grammar(config, parser, self.tool_tokens,
                                              self.mistral_style)
                changes["structured"] = StructuredSpec("grammar", grammar)
            if _PARSER_MARKERS[parser] & self.tool_markers.keys():
                changes["skip_special_tokens"] = False  # the parser must see the markers
            stop = single_call_stop(config, parser)
            if stop is not None and len(req.params.stop) < MAX_STOP_STRINGS:
                # parallel_tool_calls false: end at the first call's end, not past it (the
                # parser's max_calls is the guarantee; a full stop list just costs tokens)
                changes["stop"] = [*req.params.stop, stop]
            if changes:
                req.params = dataclasses.replace(req.params, **changes)
        return messages, tools

    async def prepare(self, req: GenRequest, chat: bool) -> Job:
        """Tokenize on the engine thread and check the length before anything is queued."""
        def encode(e: Any) -> tuple[str, list[int]]:
            text, ids = e.encode(prompt)
            return (text if text is not None else e.tokenizer.decode(ids)
                    if e.tokenizer is not None else ""), ids

        try:
            if chat:
                messages, tools = self.prepare_tools(req)
                prompt = await self.render_chat(messages, tools)
            else:
                prompt = req.prompt
            text, ids = await self.ae.run_sync(encode)
        except ValueError as e:  # bad ids, empty prompt, template errors, no tokenizer
            raise ApiError(400, str(e), param="messages" if chat else "prompt") from None
        max_tokens, max_len = req.params.max_tokens, self.engine.max_seq_len
        if len(ids) + (max_tokens or 1) > max_len:
            raise ApiError(400, f"the prompt is {len(ids)} tokens and max_tokens is "
                                f"{max_tokens}: over the engine's max_seq_len of {max_len}",
                           param="max_tokens", code="context_length_exceeded")
        return Job(req, chat, self.config.model_name, text, ids, self.decode)

    def cache_salt(self, request: Request, req: GenRequest) -> str | None:
        """The request's prefix-cache partition: with API keys, each key's own (so one tenant
        cannot learn from hits or timings what another sent), narrowed by the request's
        `cache_salt`; without keys, shared unless the request sends one."""
        tenant = b""
        if self.config.api_keys:  # the guard has checked the key already
            auth = request.headers.get("authorization", "").encode("latin-1")
            tenant = hashlib.sha256(bearer(auth)).digest()
        if not tenant and req.cache_salt is None:
            return None
        return hashlib.sha256(tenant + b"\0" + (req.cache_salt or "").encode(
            "utf-8", "surrogatepass")).hexdigest()

    def timed_out(self) -> ApiError:
        return ApiError(504, "the request did not finish within the server's "
                             f"--request-timeout of {self.config.request_timeout:g} s",
                        type_="timeout_error", code="request_timeout")

    async def deadline(self, work: Any) -> Any:
        try:
            return await asyncio.wait_for(work, self.config.request_timeout)  # cancel: abort
        except TimeoutError:
            raise self.timed_out() from None

    async def stream(self, job: Job, route: str, start: float,
                     chunks: AsyncIterator[str], first: str | None) -> AsyncIterator[str]:
        """The job's SSE chunks (`first` already taken from `chunks`) under --request-timeout;
        the request's slot is given back, and it is logged, when the stream ends."""
        timeout = self.config.request_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if first is not None:
                yield first
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    chunk = await asyncio.wait_for(anext(chunks), left)
                except StopAsyncIteration:
                    break
                except TimeoutError:  # the stream's request is aborted by the cancellation
                    job.finish_reasons.append("timeout")
                    yield sse(self.timed_out().body())
                    yield "data: [DONE]\n\n"
                    break
                yield chunk
        finally:
            self.inflight -= 1
            self.finish(job, route, start, 200)
            # a cancelled anext may still be unwinding it; its own finally aborts the request
            with contextlib.suppress(RuntimeError):
                await chunks.aclose()

    def finish(self, job: Job | None, route: str, start: float, status: int) -> None:
        """The request's log line, and its metrics if it ran."""
        _log_request(job, route, start, status)
        if job is not None:
            self.metrics.observe(job.timings, job.finish_reasons)


def _state(request: Request) -> ServerState:
    return request.app.state.server


# ---- routes -----------------------------------------------------------------------------------

router = APIRouter()


async def _generate(request: Request, chat: bool) -> Any:
    state, start, route = _state(request), time.monotonic(), request.url.path
    job: Job | None = None
    status, admitted, streaming = 200, False, False
    try:
        state.admit()  # before the first await; reading the body has a deadline
        admitted = True
        job = await state.prepare(await state.read_request(request, chat), chat)
        job.cache_salt = state.cache_salt(request, job.req)
        if job.req.stream:
            chunks = run_stream(state.ae, job)
            first = None
            if job.req.params.structured is not None:
                # run_stream waits for the engine's first output before its first chunk: a
                # grammar that fails to compile is a 400 here, before the 200 is sent
                first = await _first_chunk(request, state, chunks)
            admitted = False  # the stream gives its slot back when it ends
            streaming = True
            return StreamingResponse(state.stream(job, route, start, chunks, first),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _until_disconnect(request, state.deadline(run_whole(state.ae, job)))
    except ApiError as e:
        status = e.status
        if job is None or status >= 429:
            state.metrics.rejected.labels(str(status)).inc()
        raise
    except EngineDeadError:
        status = 503
        raise
    except Exception:
        status = 500
        raise
    finally:
        if admitted:
            state.inflight -= 1
        if not streaming:
            state.finish(job, route, start, status)


async def _first_chunk(request: Request, state: ServerState,
                       chunks: AsyncIterator[str]) -> str | None:
    """The stream's first chunk, under the request's deadline and watching for a client that
    hangs up; a request the engine refused raises its ApiError."""
    async def first() -> str | None:
        return await anext(chunks, None)

    try:
        got = await _until_disconnect(request, state.deadline(first()))
    except BaseException:
        await chunks.aclose()
        raise
    if isinstance(got, JSONResponse):  # the client hung up (499)
        await chunks.aclose()
        raise ApiError(499, "client closed the request")
    return got


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    return await _generate(request, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    return await _generate(request, chat=True)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"object": "list", "data": [{"id": state.config.model_name, "object": "model",
                                        "created": 0, "owned_by": "llm-engine",
                                        "max_model_len": state.engine.max_seq_len}]}


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    state = _state(request)
    req = validate(TokenizeRequest, await json_body(request, state.config.max_body_bytes))
    if req.messages is not None:
        try:
            text = await state.render_chat([m.for_template() for m in req.messages])
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
    else:
        text = req.prompt
    try:
        tokens = await state.ae.run_sync(lambda e: e.encode(text)[1])
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.max_seq_len}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    state = _state(request)
    body = await json_body(request, state.config.max_body_bytes)
    tokens = validate(DetokenizeRequest, body, vocab_size=state.engine.vocab_size).tokens
    if state.engine.tokenizer is None:
        raise ApiError(400, "this engine has no tokenizer")
    return {"prompt": await state.ae.run_sync(lambda e: e.tokenizer.decode(tokens))}


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    ae = _state(request).ae
    if ae.alive:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "error", "error": str(ae.error or "engine stopped")},
                        status_code=503)


# ---- errors -----------------------------------------------------------------------------------

async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return error_response(e)


async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
    return error_response(ApiError(400, f"invalid request: {e.errors()}"[:500]))


async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(ApiError(e.status_code, str(e.detail),
                                   type_="not_found_error" if e.status_code == 404
                                   else "invalid_request_error"))


async def _internal(_: Request, e: Exception) -> JSONResponse:
    log.exception("internal error")
    return error_response(ApiError(500, f"internal error: {type(e).__name__}",
                                   type_="server_error"))


async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
    return error_response(ApiError(503, str(e), type_="server_error", code="engine_dead"))


ERROR_HANDLERS: dict[Any, Callable[..., Any]] = {
    ApiError: _api_error, RequestValidationError: _validation,
    StarletteHTTPException: _http, Exception: _internal, EngineDeadError: _dead}


def create_app(ae: AsyncEngine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="llm-engine", docs_url=None, redoc_url=None, openapi_url=None,
                  exception_handlers=ERROR_HANDLERS)
    app.state.server = ServerState(ae, config)
    app.include_router(router)
    app.add_middleware(Guard, api_keys=config.api_keys, max_body_bytes=config.max_body_bytes)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["*"], allow_headers=["*"])
    return app


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await `work`, cancelling it (which aborts its requests) if the client goes away: a
    non-streaming client that hangs up must not keep the engine busy."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # let the cancellation run, so the requests are aborted before we return
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return JSONResponse(ApiError(499, "client closed the request").body(), status_code=499)
    return task.result()


def _log_request(job: Job | None, route: str, start: float, status: int) -> None:
    log.info(json.dumps({
        "id": job.id if job else None, "route": route, "status": status,
        "prompt_tokens": len(job.prompt_ids) if job else None,
        "completion_tokens": job.completion_tokens if job else None,
        "finish_reason": ",".join(job.finish_reasons) if job and job.finish_reasons else None,
        "latency_s": round(time.monotonic() - start, 4)}))


def serve(ae: AsyncEngine, config: ServerConfig, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT. uvicorn then stops accepting, lets in-flight requests run
    for up to config.shutdown_timeout seconds and cancels the rest (which aborts them in the
    engine); then the engine loop stops."""
    import uvicorn

    handler = logging.StreamHandler()  # stderr: one JSON line per request
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    uv = uvicorn.Config(create_app(ae, config), host=host, port=port, log_level="warning",
                        access_log=False,
                        timeout_graceful_shutdown=max(1, round(config.shutdown_timeout)))
    # uvicorn re-raises the signal that stopped it once it is done, which would kill the process
    # (exit -15) before the engine shuts down: a no-op handler makes that re-raise harmless.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(uv).run()
    finally:
        ae.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
