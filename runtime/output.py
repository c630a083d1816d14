"""What a request hands its caller, token by token: the `Output` objects, and the stop checks
(stop token ids, EOS, stop strings, length) that set its finish reason and decide how much of
its text is visible yet. The engine's loop (runtime.engine) calls these once per sampled token
and once per Output it returns.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_engine.runtime.request import Request
    from llm_engine.runtime.sampling import Sample


@dataclass
class Output:
    """A request's state as handed to callers: the whole output so far plus, for streaming,
    what is new since the last Output of the same request (`delta_*`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; stop | length | abort | error
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float | None] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def append_token(req: Request, s: Sample, eos_token_ids: Collection[int]) -> str | None:
    """Add the sampled token `s` to `req` (ids, sampler state, logprobs, text). Returns the
    finish reason it ends the request with, "stop" or "length" (its text is then complete),
    or None while it goes on; finishing it in the scheduler is the caller's."""
    token = s.token_id
    req.all_ids.append(token)
    req.sampler.append(token)
    if req.logprobs is not None:
        req.logprobs.append(s.top_logprobs or {token: s.logprob})
    params = req.params
    stopped_by_token = (
        req.num_output >= params.min_tokens
        and (token in req.stop_ids
             or (not params.ignore_eos and token in eos_token_ids)))
    # A stopping token adds no text, except a stop_token_id shown with special tokens kept.
    shown = not stopped_by_token or (token in req.stop_ids
                                     and not params.skip_special_tokens)
    if req.detok is not None and shown:
        req.text += req.detok.step(token)
    if stopped_by_token:
        flush(req)  # hand out what the detokenizer still holds, as "length" does
        return "stop"
    if params.stop and req.num_output >= params.min_tokens and _cut_at_stop_string(req):
        return "stop"
    if len(req.all_ids) >= req.max_total_tokens:
        flush(req)
        return "length"
    return None


def _cut_at_stop_string(req: Request) -> bool:
    """Whether the text now holds one of the request's stop strings; if so, cut it there."""
    params = req.params
    longest = max(len(s) for s in params.stop)
    # Only the new text (plus an overlap for stops spanning the boundary) can hold a match.
    lo = max(0, req.sent_text - longest)
    best = None
    for stop in params.stop:
        at = req.text.find(stop, lo)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    if best is None:
        return False
    at, stop = best
    req.text = req.text[:at + len(stop)] if params.include_stop_str_in_output \
        else req.text[:at]
    return True


def flush(req: Request) -> None:
    """Append text the detokenizer holds back (an incomplete character at the end)."""
    if req.detok is not None:
        req.text += req.detok.flush()


def make_output(req: Request) -> Output:
    """The request's Output now; its deltas are what is new since the last one made (this
    advances `req.sent_text` and `req.sent_tokens`)."""
    text = req.text
    if req.finish_reason is None and req.params.stop:
        # Hold back what could still turn out to be the start of a stop string.
        hold = max(len(s) for s in req.params.stop) - 1
        visible = max(req.sent_text, len(text) - hold)
    else:
        visible = len(text)
    delta_text = text[req.sent_text:visible]
    req.sent_text = visible
    delta_ids = req.output_ids[req.sent_tokens:]
    req.sent_tokens = req.num_output
    if req.finish_reason is not None:
        req.finish_time = req.finish_time or time.monotonic()
    return Output(
        request_id=req.id, prompt=req.prompt_text, prompt_token_ids=req.prompt_ids,
        text=text[:visible], token_ids=req.output_ids, finish_reason=req.finish_reason,
        delta_text=delta_text, delta_token_ids=delta_ids,
        logprobs=list(req.logprobs) if req.logprobs is not None else None,
        prompt_logprobs=req.prompt_logprobs if req.finish_reason else None,
        error=req.error, num_cached_tokens=req.num_cached_tokens,
        metrics={"arrival": req.arrival, "first_scheduled": req.first_scheduled_time,
                 "first_token": req.first_token_time, "finish": req.finish_time,
                 "preemptions": req.num_preemptions,
                 **({"spec_proposed_tokens": req.spec.proposed,
                     "spec_accepted_tokens": req.spec.accepted} if req.spec is not None
                    else {})})
