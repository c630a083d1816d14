"""Per-request sampling parameters: `SamplingParams`, its validation and its bounds.

Split from runtime.sampling, which holds the per-request state and the batch step, so the
public request-facing type (re-exported as `llm_engine.SamplingParams`) and its checks read on
their own (this module itself imports no torch). Names and defaults match vLLM's `SamplingParams`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
# Stop conditions are checked on every generated token on the engine thread, which every request
# shares, so a client's list has a bound (OpenAI takes 4 stop strings; these leave room for
# programmatic use): the per-token cost is then at most 64 searches of a window of about 1,000
# characters, and stop ids are looked up in a set.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
# Below this a temperature is treated as greedy: dividing by it would overflow fp32 logits.
_GREEDY_EPS = 1e-5
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """Per-request sampling parameters; names and defaults match vLLM's `SamplingParams`."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # 0 (with prompt_logprobs): score the prompt, sample nothing
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs: a runtime.structured.StructuredSpec, or a vLLM-style dict
    # {"json": schema} | {"regex": ...} | {"choice": [...]} | {"grammar": ...} |
    # {"json_object": True}; checked here (ValueError naming the problem)
    structured: Any = None

    def __post_init__(self) -> None:
        if self.structured is not None:
            from llm_engine.runtime.structured.spec import parse

            self.structured = parse(self.structured)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            setattr(self, name, float(v))
        for name in ("top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not _is_int(v):
                raise ValueError(f"{name} must be an integer or None, got {v!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise ValueError(f"seed must be in [{_SEED_MIN}, {_SEED_MAX}], got {self.seed}")
        if self.max_tokens is not None and self.max_tokens < 1 and not (
                self.max_tokens == 0 and self.prompt_logprobs is not None):
            raise ValueError(f"max_tokens must be >= 1 or None (0 only with prompt_logprobs: "
                             f"score the prompt, generate nothing), got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}] or None, got {v}")

        # A lone string is the OpenAI shorthand for a one-element list.
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS}")
        if any(s == "" for s in stop):
            # An empty stop string matches before any text, so the request could never output.
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stop):
            raise ValueError(f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters")
        self.stop = list(stop)
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, list | tuple) or len(ids) > MAX_STOP_TOKEN_IDS or \
                not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} "
                             f"integers >= 0, got {str(self.stop_token_ids)[:200]}")
        self.stop_token_ids = list(ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        """Build from a JSON-like mapping (an HTTP request body's sampling fields).

        Unknown keys are an error rather than ignored, so a misspelt parameter is not silently
        dropped. A null value for a field that does not accept None means "use the default",
        since many clients send every field with null for unset ones."""
        if not isinstance(d, Mapping):
            raise ValueError(f"sampling parameters must be an object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; "
                             f"valid: {', '.join(fields)}")
        nullable = {"seed", "max_tokens", "logprobs", "prompt_logprobs", "stop", "stop_token_ids"}
        return cls(**{k: v for k, v in d.items() if v is not None or k in nullable})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        spec = self.structured
        if spec is not None:  # as the vLLM-style dict from_dict (and the constructor) take
            d["structured"] = {"json_object": True} if spec.kind == "json_object" else \
                {spec.kind: list(spec.value) if spec.kind == "choice" else spec.value}
        return d
