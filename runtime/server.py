"""`engine serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over AsyncEngine.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize,
POST /detokenize, GET /health. Every error is OpenAI's body
{"error": {"message", "type", "param", "code"}}; bad input is a 4xx before anything is queued,
never a 500. `create_app` builds the app for any AsyncEngine (tests run it in-process);
`serve` runs it until SIGTERM/SIGINT and then shuts the engine down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_engine.runtime.async_engine import AsyncEngine, EngineDeadError
from llm_engine.runtime.server_generate import Job, run_stream, run_whole, sse
from llm_engine.runtime.server_metrics import ServerMetrics
from llm_engine.runtime.server_protocol import (
    ApiError,
    GenRequest,
    Limits,
    parse_chat,
    parse_completion,
    parse_messages,
)
from llm_engine.runtime.tokenizer import RenderBudget

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
    limits: Limits = field(init=False)

    def __post_init__(self) -> None:
        self.limits = Limits(self.max_n, self.max_logprobs)


def _error(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else \
        {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _bearer(auth: bytes) -> bytes:
    """The key of an `Authorization: Bearer KEY` header value (b"" for any other)."""
    return auth[7:].strip() if auth[:7].lower() == b"bearer " else b""


class _Guard:
    """ASGI middleware for what must hold before any route runs: the API key (on every path but
    /health) and the body-size limit by Content-Length. Plain ASGI rather than
    BaseHTTPMiddleware, which would buffer streams and hide client disconnects."""

    def __init__(self, app: Any, config: ServerConfig) -> None:
        self.app = app
        self.keys = [k.encode() for k in config.api_keys]
        self.max_body = config.max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            problem = self._check(scope["path"], headers)
            if problem is not None:
                await _error(problem)(scope, receive, send)
                return
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running at the end of a graceful shutdown; the
            # request has been aborted by then, and a traceback per request would be noise.
            if scope["type"] != "http":
                raise

    def _check(self, path: str, headers: dict[bytes, bytes]) -> ApiError | None:
        if self.keys and path != "/health":
            given = _bearer(headers.get(b"authorization", b""))
            # compare with every key, so timing tells nothing about which (or whether) matched
            ok = False
            for key in self.keys:
                ok |= hmac.compare_digest(given, key)
            if not ok:
                return ApiError(401, "missing or invalid API key (send Authorization: Bearer "
                                     "KEY)", type_="authentication_error",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return ApiError(413, f"request body over {self.max_body} bytes",
                            code="request_too_large")
        return None


async def _json_body(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body; 413 past max_bytes even without a Content-Length (chunked)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"request body over {max_bytes} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except RecursionError:
        raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    _check_json(body)
    return body


# Deeper than any OpenAI request (a chat message's content parts are ~5 levels); validation
# and templates recurse over what they are given, so depth is bounded before they see it.
MAX_JSON_DEPTH = 32


def _check_json(body: Any) -> None:
    """400 for a body nesting deeper than MAX_JSON_DEPTH or holding a lone UTF-16 surrogate
    (valid JSON, but no text: the tokenizer and the response encoder would fail on it).
    Iterative, so the check itself cannot recurse too deep; the body is at most max_bytes."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(k, str):
                    _check_text(k)
                stack.append((v, depth + 1))
        elif isinstance(value, str):
            _check_text(value)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"the body holds a lone surrogate ({text[e.start]!r} at "
                            f"{e.start}); send valid UTF-8 text") from None


def _decoder(engine: Any):
    tok = engine.tokenizer
    if tok is None:
        return lambda t: f"token_id:{t}"
    return lambda t: tok.decode([t], skip_special_tokens=False)


def _log(fields: dict[str, Any]) -> None:
    log.info(json.dumps(fields))


def create_app(ae: AsyncEngine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="llm-engine", docs_url=None, redoc_url=None, openapi_url=None)
    engine = ae.engine
    decode = _decoder(engine)
    metrics = ServerMetrics(engine)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error(ApiError(400, f"invalid request: {e.errors()}"[:500]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(ApiError(e.status_code, str(e.detail),
                               type_="not_found_error" if e.status_code == 404
                               else "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(ApiError(500, f"internal error: {type(e).__name__}", type_="server_error"))

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return _error(ApiError(503, str(e), type_="server_error", code="engine_dead"))

    def cache_salt(request: Request, req: GenRequest) -> str | None:
        """The request's prefix-cache partition: with API keys, each key's own (so one tenant
        cannot learn from hits or timings what another sent), narrowed by the request's
        `cache_salt`; without keys, shared unless the request sends one."""
        tenant = b""
        if config.api_keys:  # the guard has checked the key already
            auth = request.headers.get("authorization", "").encode("latin-1")
            tenant = hashlib.sha256(_bearer(auth)).digest()
        if not tenant and req.cache_salt is None:
            return None
        return hashlib.sha256(tenant + b"\0" + (req.cache_salt or "").encode(
            "utf-8", "surrogatepass")).hexdigest()

    async def render_chat(messages: list[dict[str, Any]]) -> str:
        """The chat template rendered off the engine thread (which every request shares), in
        a worker thread under a time and output budget: a slow template or a conversation
        built to make it slow costs its own request a 400, not everyone a stall."""
        budget = RenderBudget(seconds=config.template_timeout)
        return await asyncio.to_thread(engine.apply_chat_template, messages, budget=budget)

    async def prepare(req: GenRequest, chat: bool) -> Job:
        """Tokenize on the engine thread and check the length before anything is queued."""
        def encode(e: Any) -> tuple[str, list[int]]:
            text, ids = e.encode(prompt)
            return (text if text is not None else e.tokenizer.decode(ids)
                    if e.tokenizer is not None else ""), ids

        try:
            prompt = await render_chat(req.messages) if chat else req.prompt
            text, ids = await ae.run_sync(encode)
        except ValueError as e:  # bad ids, empty prompt, template errors, no tokenizer
            raise ApiError(400, str(e), param="messages" if chat else "prompt") from None
        max_tokens = req.params.max_tokens
        if len(ids) + (max_tokens or 1) > engine.max_seq_len:
            raise ApiError(400, f"the prompt is {len(ids)} tokens and max_tokens is "
                                f"{max_tokens}: over the engine's max_seq_len of "
                                f"{engine.max_seq_len}", param="max_tokens",
                           code="context_length_exceeded")
        return Job(req, chat, config.model_name, text, ids, decode)

    inflight = [0]  # generation requests admitted and not yet ended

    async def generate(request: Request, chat: bool) -> Any:
        start = time.monotonic()
        job: Job | None = None
        route = request.url.path
        status = 200
        admitted = False
        try:
            limit = config.max_concurrent_requests
            if limit is not None and inflight[0] >= limit:
                raise ApiError(429, f"the server is at its limit of {limit} concurrent "
                                    "requests; retry shortly", type_="rate_limit_error",
                               code="too_many_requests")
            # The slot is taken before the first await (nothing can run between the check and
            # here): clients that send headers, stall, then send bodies each hold a slot while
            # they stall, instead of all passing the check first. Reading the body has a
            # deadline, so a stalled client gives its slot back.
            inflight[0] += 1
            admitted = True
            try:
                body = await asyncio.wait_for(_json_body(request, config.max_body_bytes),
                                              config.body_timeout)
            except TimeoutError:
                raise ApiError(408, "the request body did not arrive within the server's "
                                    f"--body-timeout of {config.body_timeout:g} s",
                               code="request_timeout") from None
            parse = parse_chat if chat else parse_completion
            job = await prepare(parse(body, config.limits), chat)
            job.cache_salt = cache_salt(request, job.req)
            if job.req.stream:
                admitted = False  # the stream releases its slot when it ends
                return StreamingResponse(_logged_stream(job, route, start),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return await _until_disconnect(request, _deadline(run_whole(ae, job)))
        except ApiError as e:
            status = e.status
            if job is None or status >= 429:
                metrics.rejected.labels(str(status)).inc()
            raise
        except EngineDeadError:
            status = 503
            raise
        except Exception:
            status = 500
            raise
        finally:
            if admitted:
                inflight[0] -= 1
            if job is None or not job.req.stream:
                _log_request(job, route, start, status)
                if job is not None:
                    metrics.observe(job.timings, job.finish_reasons)

    def timed_out() -> ApiError:
        return ApiError(504, "the request did not finish within the server's "
                             f"--request-timeout of {config.request_timeout:g} s",
                        type_="timeout_error", code="request_timeout")

    async def _deadline(work: Any) -> Any:
        try:
            return await asyncio.wait_for(work, config.request_timeout)  # cancelling aborts
        except TimeoutError:
            raise timed_out() from None

    async def _logged_stream(job: Job, route: str, start: float) -> AsyncIterator[str]:
        chunks = run_stream(ae, job)
        deadline = None if config.request_timeout is None else \
            time.monotonic() + config.request_timeout
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    chunk = await asyncio.wait_for(anext(chunks), left)
                except StopAsyncIteration:
                    break
                except TimeoutError:  # the stream's request is aborted by the cancellation
                    job.finish_reasons.append("timeout")
                    yield sse(timed_out().body())
                    yield "data: [DONE]\n\n"
                    break
                yield chunk
        finally:
            inflight[0] -= 1
            _log_request(job, route, start, 200)
            metrics.observe(job.timings, job.finish_reasons)
            # a cancelled anext may still be unwinding it; its own finally aborts the request
            with contextlib.suppress(RuntimeError):
                await chunks.aclose()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": 0, "owned_by": "llm-engine",
                                            "max_model_len": engine.max_seq_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await _json_body(request, config.max_body_bytes)
        if not isinstance(body, dict) or len(set(body) & {"prompt", "messages"}) != 1:
            raise ApiError(400, 'send {"prompt": "..."} or {"messages": [...]}')
        if "messages" in body:
            try:
                text = await render_chat(parse_messages(body["messages"]))
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from None
            fn = lambda e: e.encode(text)[1]  # noqa: E731
        elif isinstance(body["prompt"], str) and body["prompt"]:
            fn = lambda e: e.encode(body["prompt"])[1]  # noqa: E731
        else:
            raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        try:
            tokens = await ae.run_sync(fn)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await _json_body(request, config.max_body_bytes)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool)
                and 0 <= t < engine.vocab_size for t in tokens):
            raise ApiError(400, f"tokens must be a list of ids in [0, {engine.vocab_size})",
                           param="tokens")
        if engine.tokenizer is None:
            raise ApiError(400, "this engine has no tokenizer")
        return {"prompt": await ae.run_sync(lambda e: e.tokenizer.decode(tokens))}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> JSONResponse:
        if ae.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error", "error": str(ae.error or "engine stopped")},
                            status_code=503)

    app.add_middleware(_Guard, config=config)
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
    _log({"id": job.id if job else None, "route": route, "status": status,
          "prompt_tokens": len(job.prompt_ids) if job else None,
          "completion_tokens": job.completion_tokens if job else None,
          "finish_reason": ",".join(job.finish_reasons) if job and job.finish_reasons else None,
          "latency_s": round(time.monotonic() - start, 4)})


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
