"""A request's state as the scheduler and engine see it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


FINISH_REASONS = ("stop", "length", "abort", "error")
MAX_CACHE_SALT_CHARS = 256  # a request's cache_salt (Engine.add_request, the server's field)


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: Any  # SamplingParams
    max_total_tokens: int  # prompt + output may not exceed this (params and engine limits)
    priority: int = 0  # lower runs first (vLLM's convention)
    arrival: float = field(default_factory=time.monotonic)
    seqno: int = 0  # admission order tie-break, kept across preemption
    prompt_text: str | None = None

    status: Status = Status.WAITING
    all_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed: int = 0  # leading tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of the prompt, served from the prefix cache
    num_preemptions: int = 0
    finish_reason: str | None = None
    error: str | None = None
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    finish_time: float | None = None
    sampler: Any = None  # SamplerState
    detok: Any = None  # IncrementalDetokenizer
    text: str = ""
    sent_text: int = 0  # chars of `text` already handed out as deltas
    sent_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None

    # speculative decoding: the tokens proposed for the next step (runtime.speculative)
    draft_ids: list[int] = field(default_factory=list)
    spec: Any = None  # runtime.speculative.SpecState, when the engine speculates
    # structured outputs: the grammar's compile (a Future) until admitted, then its matcher
    grammar: Any = None
    matcher: Any = None

    stop_ids: frozenset[int] = frozenset()  # params.stop_token_ids, for per-token lookups
    cache_salt: bytes = b""  # prefix-cache partition (tenant and request salt); b"": shared

    def __post_init__(self) -> None:
        if not self.all_ids:
            self.all_ids = list(self.prompt_ids)
        self.stop_ids = frozenset(getattr(self.params, "stop_token_ids", None) or ())

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.all_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.all_ids) - self.num_prompt

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def wants_prompt_logprobs(self) -> bool:
        return (self.params.prompt_logprobs is not None and self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt)
