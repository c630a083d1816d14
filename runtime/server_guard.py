"""What `engine serve` checks before a route validates a body: the API key and the body size
(ASGI middleware, before any route runs), and the body itself read under a size limit and
parsed as JSON no deeper than MAX_JSON_DEPTH and holding no lone surrogate. Every refusal is an
ApiError, sent as OpenAI's error body by `error_response`."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from llm_engine.runtime.server_protocol import ApiError

# Deeper than any OpenAI request (a chat message's content parts are ~5 levels); validation
# and templates recurse over what they are given, so depth is bounded before they see it.
MAX_JSON_DEPTH = 32


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else \
        {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def bearer(auth: bytes) -> bytes:
    """The key of an `Authorization: Bearer KEY` header value (b"" for any other)."""
    return auth[7:].strip() if auth[:7].lower() == b"bearer " else b""


class Guard:
    """ASGI middleware for what must hold before any route runs: the API key (on every path but
    /health) and the body-size limit by Content-Length. Plain ASGI rather than
    BaseHTTPMiddleware, which would buffer streams and hide client disconnects."""

    def __init__(self, app: Any, api_keys: Sequence[str], max_body_bytes: int) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            problem = self._check(scope["path"], headers)
            if problem is not None:
                await error_response(problem)(scope, receive, send)
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
            given = bearer(headers.get(b"authorization", b""))
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


async def json_body(request: Request, max_bytes: int) -> Any:
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
