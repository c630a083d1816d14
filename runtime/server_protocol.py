"""The OpenAI wire format for `engine serve`: request bodies in, response objects out.

Bodies are validated by hand rather than by pydantic models so that every bad field gets one
OpenAI-style error naming it (`param`), and so that the checks match SamplingParams' own.
Unknown fields are an error: a misspelt parameter must not be silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_engine.runtime.request import MAX_CACHE_SALT_CHARS
from llm_engine.runtime.sampling import SamplingParams


class ApiError(Exception):
    """An error the client caused (or must hear about), sent as OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Limits:
    max_n: int = 8
    max_logprobs: int = 20


# Fields accepted by both endpoints: name -> kind. Kinds are checked by _typed.
_SAMPLING = {
    "temperature": "number", "top_p": "number", "top_k": "int", "min_p": "number",
    "seed": "int", "stop": "stop", "stop_token_ids": "int_list",
    "presence_penalty": "number", "frequency_penalty": "number",
    "repetition_penalty": "number", "ignore_eos": "bool", "min_tokens": "int",
    "n": "int", "stream": "bool", "stream_options": "object", "max_tokens": "int",
    "skip_special_tokens": "bool", "include_stop_str_in_output": "bool", "model": "str",
    "user": "str", "cache_salt": "str",
}
_COMPLETION = {**_SAMPLING, "prompt": "any", "echo": "bool", "logprobs": "int"}
_CHAT = {**_SAMPLING, "messages": "any", "logprobs": "bool", "top_logprobs": "int",
         "max_completion_tokens": "int"}


def _typed(body: Mapping[str, Any], spec: Mapping[str, str]) -> dict[str, Any]:
    """The non-null fields of body, each checked against its kind (400 naming the field)."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(k for k in body if k not in spec)
    if unknown:
        raise ApiError(400, f"unknown or unsupported field(s): {', '.join(unknown)}",
                       param=unknown[0])
    out: dict[str, Any] = {}
    for name, value in body.items():
        if value is None:  # clients send unset fields as null
            continue
        kind = spec[name]
        ok = {
            "number": isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "object": isinstance(value, Mapping),
            "stop": isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(s, str) for s in value)),
            "int_list": isinstance(value, list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value),
            "any": True,
        }[kind]
        if not ok:
            what = {"number": "a finite number", "int": "an integer", "bool": "a boolean",
                    "str": "a string", "object": "an object",
                    "stop": "a string or a list of strings", "int_list": "a list of integers"}
            raise ApiError(400, f"'{name}' must be {what[kind]}, got {value!r}"[:300],
                           param=name)
        out[name] = value
    return out


@dataclass
class GenRequest:
    """One parsed generation request, for either endpoint."""

    prompt: str | list[int] | None  # completions; chat has messages instead
    messages: list[dict[str, Any]] | None
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None  # top-N per output token (None: no logprobs)
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks shared only within a salt


def _stream_opts(f: dict[str, Any]) -> bool:
    opts = f.get("stream_options") or {}
    extra = sorted(set(opts) - {"include_usage", "continuous_usage_stats"})
    if extra:
        raise ApiError(400, f"unknown stream_options field(s): {', '.join(extra)}",
                       param="stream_options")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError(400, "stream_options.include_usage must be a boolean",
                       param="stream_options")
    if opts and not f.get("stream"):
        raise ApiError(400, "stream_options is only allowed with stream: true",
                       param="stream_options")
    return usage


def _params(f: dict[str, Any], limits: Limits, max_tokens: int | None, logprobs: int | None,
            prompt_logprobs: int | None) -> SamplingParams:
    n = f.get("n", 1)
    if not 1 <= n <= limits.max_n:
        raise ApiError(400, f"n must be in [1, {limits.max_n}], got {n}", param="n")
    for v in (logprobs, prompt_logprobs):
        if v is not None and not 0 <= v <= limits.max_logprobs:
            raise ApiError(400, f"logprobs must be in [0, {limits.max_logprobs}], got {v}",
                           param="top_logprobs" if "top_logprobs" in f else "logprobs")
    keys = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
            "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
            "min_tokens", "skip_special_tokens", "include_stop_str_in_output")
    fields = {k: f[k] for k in keys if k in f}
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, **fields)
    except ValueError as e:  # SamplingParams names the field first: reuse it as param
        raise ApiError(400, str(e), param=str(e).split()[0]) from None


def _cache_salt(f: Mapping[str, Any]) -> str | None:
    salt = f.get("cache_salt")
    if salt is not None and not 0 < len(salt) <= MAX_CACHE_SALT_CHARS:
        raise ApiError(400, f"cache_salt must be 1 to {MAX_CACHE_SALT_CHARS} characters",
                       param="cache_salt")
    return salt


def _prompt(value: Any) -> str | list[int]:
    """A string or token ids; a list holding one of those is accepted too (one prompt)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ApiError(400, "prompt is empty", param="prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int)
                                                 and not isinstance(t, bool) for t in value):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str | list)
                                                          for p in value):
        raise ApiError(400, "one prompt per request: send several requests (they are batched "
                            "together)", param="prompt")
    if isinstance(value, list) and not value:
        raise ApiError(400, "prompt is empty", param="prompt")
    raise ApiError(400, "prompt must be a string or a list of token ids", param="prompt")


def parse_completion(body: Any, limits: Limits) -> GenRequest:
    f = _typed(body, _COMPLETION)
    if "prompt" not in f:
        raise ApiError(400, "prompt is required", param="prompt")
    prompt = _prompt(f["prompt"])
    echo = f.get("echo", False)
    logprobs = f.get("logprobs")
    params = _params(f, limits, f.get("max_tokens", 16), logprobs,
                     logprobs if echo and logprobs is not None else None)
    return GenRequest(prompt, None, params, f.get("n", 1), f.get("stream", False),
                      _stream_opts(f), echo, logprobs, _cache_salt(f))


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # OpenAI's content parts: only text parts can be rendered by a text model.
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param="messages")


def parse_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'",
                           param="messages")
        out.append({**m, "content": _content(m, i)})
    return out


def parse_chat(body: Any, limits: Limits) -> GenRequest:
    f = _typed(body, _CHAT)
    if "messages" not in f:
        raise ApiError(400, "messages is required", param="messages")
    messages = parse_messages(f["messages"])
    top = f.get("top_logprobs")
    if top is not None and not f.get("logprobs"):
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (top or 0) if f.get("logprobs") else None
    max_tokens = f.get("max_completion_tokens", f.get("max_tokens"))
    params = _params(f, limits, max_tokens, logprobs, None)
    return GenRequest(None, messages, params, f.get("n", 1), f.get("stream", False),
                      _stream_opts(f), False, logprobs, _cache_salt(f))


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of n: a seeded request gets seed + index, so the n choices differ but
    the whole response is still reproducible."""
    if index == 0 or params.seed is None:
        return params
    d = params.to_dict()
    d["seed"] = params.seed + index
    return SamplingParams(**d)


# ---- logprobs formatting ----------------------------------------------------------------------

def completion_logprobs(decode, token_ids: list[int], entries: list[dict[int, float] | None],
                        offset: int) -> dict[str, Any]:
    """OpenAI's legacy completions logprobs object for these tokens. `entries[i]` maps
    token id -> logprob (top-N plus the chosen token); None for the prompt's first token."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        text = decode(tid)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(entry.get(tid))
        tops.append({decode(t): lp for t, lp in entry.items()})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(decode, token_ids: list[int], entries: list[dict[int, float]],
                  top_n: int) -> dict[str, Any]:
    """OpenAI's chat logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(t: int, lp: float) -> dict[str, Any]:
        s = decode(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    content = []
    for tid, entry in zip(token_ids, entries):
        # entry holds the top-N plus the chosen token; OpenAI lists exactly top_n alternatives
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
        content.append({**item(tid, entry.get(tid, -math.inf)),
                        "top_logprobs": [item(t, lp) for t, lp in top]})
    return {"content": content}
