"""The OpenAI wire format of `engine serve` that the routes and the generation share: the
error a client hears (ApiError, sent as OpenAI's error body), the server's limits on a request,
a parsed generation request (GenRequest, built from a validated body by server_requests), and
the logprobs objects of the responses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from llm_engine.runtime.sampling_params import SamplingParams


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
    tools: Any = None  # chat: the validated tool_calls.ToolConfig (None: no tool fields sent)
    tool_parser: str | None = None  # set by the server when the reply is parsed for calls


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of n: a seeded request gets seed + index, so the n choices differ but
    the whole response is still reproducible."""
    if index == 0 or params.seed is None:
        return params
    # replace, not to_dict: asdict would turn a StructuredSpec into a plain dict
    return dataclasses.replace(params, seed=params.seed + index)


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
