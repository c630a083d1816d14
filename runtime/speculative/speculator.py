"""The engine's speculative decoding: before each step, proposals for the running decodes;
after it, the bookkeeping of what verification kept.

Policy, per step:

* **K per request** follows its acceptance: each request keeps an exponential average of the
  rate at which its drafts are kept (alpha). Draft j of a request is worth alpha^j expected
  tokens (it counts only if the j - 1 before it were kept).
* **Whether a draft pays** is measured, not guessed: the engine times every step, and a
  least-squares fit over the recent ones gives the step's cost as a + b * rows (a: reading
  the weights, b: each row's compute). Drafts are added, most valuable first, while each one's
  expected tokens exceed what the same time buys without it (b * tokens per second of the step
  so far). A small batch is memory-bound (b << a): K + 1 rows cost about one, and speculation
  pays. A large one is compute-bound: rows cost in proportion and no draft clears the bar, so
  speculation turns itself off. A draft model's own time per draft step joins the cost.
* A backend that pads every sequence to the step's longest chunk (the CPU fast path) makes a
  depth cost a row per sequence: one depth is chosen for the batch, by the same estimate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_engine.runtime.request import Request
from llm_engine.runtime.speculative.ngram import NgramIndex

METHODS = ("ngram", "draft")
MAX_SPECULATIVE_TOKENS = 16  # per request and step: each costs a row of the target's step
_ALPHA0 = 0.5  # a new request's assumed acceptance rate
_EXPLORE_BATCH = 8  # before the cost fit, only batches this small try (one guess each)
_EMA = 0.3  # weight of a step's acceptance in the average


@dataclass
class SpeculativeConfig:
    method: str  # ngram | draft
    num_tokens: int = 4  # K: the most tokens proposed per request and step
    draft_engine: str | Path | None = None
    ngram_min: int = 2
    ngram_max: int = 4
    adaptive: bool = True  # K per request and on/off per step by the measured cost

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative={self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.num_tokens, int) or not 1 <= self.num_tokens \
                <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be an integer in 1.."
                             f"{MAX_SPECULATIVE_TOKENS}, got {self.num_tokens!r}")
        if self.method == "draft" and not self.draft_engine:
            raise ValueError("speculative='draft' needs draft_engine (an engine directory "
                             "with the same tokenizer)")
        if self.method == "ngram" and self.draft_engine:
            raise ValueError("draft_engine is for speculative='draft'")
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise ValueError(f"ngram sizes must satisfy 1 <= ngram_min <= ngram_max <= 16, got "
                             f"{self.ngram_min}, {self.ngram_max}")


@dataclass
class SpecState:
    """One request's speculation: its acceptance average, counters and pending proposal."""

    alpha: float = _ALPHA0
    q: Any = None  # the pending drafts' probabilities (draft model, sampled requests)
    proposed: int = 0
    accepted: int = 0
    steps: int = 0  # verified steps with drafts
    index: NgramIndex | None = None


@dataclass
class CostModel:
    """Step seconds as a + b * tokens, fitted by least squares on recent steps."""

    points: deque = field(default_factory=lambda: deque(maxlen=64))  # the recent steps

    def add(self, tokens: int, seconds: float) -> None:
        self.points.append((tokens, seconds))

    def fit(self, flat: bool = False) -> tuple[float, float] | None:
        """(a, b), or None until 8 steps are timed. `flat`: steps all of one size give
        (their mean, 0) instead of None (a draft engine at one batch size)."""
        if len(self.points) < 8:
            return None
        n = len(self.points)
        mx = sum(p[0] for p in self.points) / n
        my = sum(p[1] for p in self.points) / n
        sxx = sum((p[0] - mx) ** 2 for p in self.points)
        if sxx == 0:
            return (my, 0.0) if flat else None
        b = sum((p[0] - mx) * (p[1] - my) for p in self.points) / sxx
        b = max(b, 0.0)
        return max(my - b * mx, 0.0), b


@dataclass
class SpecStats:
    proposed: int = 0
    accepted: int = 0
    steps: int = 0  # request-steps verified with drafts
    emitted: int = 0  # tokens those steps produced (accepted + one each)
    skipped_steps: int = 0  # steps with decodes where the policy proposed nothing
    grammar_cut: int = 0  # drafts dropped before verification: their grammar forbids them

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verified request-step (1 + accepted drafts)."""
        return self.emitted / self.steps if self.steps else 0.0

    def to_json(self) -> dict[str, float | int]:
        return {"proposed": self.proposed, "accepted": self.accepted, "steps": self.steps,
                "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_accepted_length": round(self.mean_accepted_length, 4),
                "skipped_steps": self.skipped_steps, "grammar_cut": self.grammar_cut}


class Speculator:
    def __init__(self, config: SpeculativeConfig, draft: Any = None, padded: bool = False
                 ) -> None:
        """`padded`: the backend computes sequences x longest chunk rows (step_done is then
        given that count, and depth is chosen per batch)."""
        self.config = config
        self.padded = padded
        self.draft = draft  # runtime.speculative.draft.DraftModel, for method "draft"
        self.cost = CostModel()
        self.draft_step = CostModel()  # a draft step's seconds by its batch size
        self.stats = SpecStats()
        self.draft_seconds = 0.0  # the current step's draft round

    def state(self, req: Request) -> SpecState:
        if req.spec is None:
            req.spec = SpecState(index=NgramIndex(self.config.ngram_min, self.config.ngram_max)
                                 if self.config.method == "ngram" else None)
        return req.spec

    # ---- before the step ---------------------------------------------------------------
    def propose(self, running: list[Request], live: Any = ()) -> None:
        """Set `draft_ids` of the running requests that decode this step. `live`: the ids of
        every unfinished request (a draft engine forgets the others)."""
        if self.draft is not None:
            for rid in [rid for rid in self.draft.seqs if rid not in live]:
                self.draft.release(rid)
        decoding = [r for r in running if len(r.all_ids) - r.num_computed == 1]
        for r in running:
            r.draft_ids = []
        if not decoding:
            return
        ks = self._plan([self.state(r) for r in decoding], decoding)
        if not any(ks):
            self.stats.skipped_steps += 1
            return
        reqs = [r for r, k in zip(decoding, ks, strict=True) if k]
        ks = [k for k in ks if k]
        if self.config.method == "ngram":
            for req, k in zip(reqs, ks, strict=True):
                index = req.spec.index
                index.extend(req.all_ids)
                req.draft_ids = index.propose(k)
                req.spec.q = None
                self._fit_grammar(req)
            return
        round_ = self.draft.propose(reqs, ks)
        self.draft_seconds = round_.seconds
        if round_.depth:
            self.draft_step.add(len(reqs), round_.seconds / (round_.depth + 1))
        for req, drafts, q in zip(reqs, round_.drafts, round_.q, strict=True):
            req.draft_ids = drafts
            req.spec.q = q
            self._fit_grammar(req)

    def _fit_grammar(self, req: Request) -> None:
        """Cuts a constrained request's drafts at the first one its grammar forbids: the
        target could never keep it (its row is masked) nor anything after it. The rows that
        remain are verified against the masks after each draft (runtime.structured)."""
        if req.matcher is None or not req.draft_ids:
            return
        n = req.matcher.valid_prefix(req.draft_ids)
        if n < len(req.draft_ids):
            self.stats.grammar_cut += len(req.draft_ids) - n
            req.draft_ids = req.draft_ids[:n]
            if req.spec.q is not None:
                req.spec.q = req.spec.q[:n]

    def _plan(self, states: list[SpecState], reqs: list[Request]) -> list[int]:
        """K for each decoding request (0: none), from acceptance and the measured cost."""
        k_max = self.config.num_tokens
        room = [max(0, min(k_max, r.max_total_tokens - len(r.all_ids))) for r in reqs]
        if not self.config.adaptive:
            return room
        fit = self.cost.fit()
        if fit is None:
            # Still measuring. A small batch tries one guess each, which spreads the steps'
            # sizes for the fit at little cost; a large one waits for the sizes that
            # prefills and finishing requests give anyway (two rows per request would cost
            # it nearly twice).
            return [min(1, r) for r in room] if len(reqs) <= _EXPLORE_BATCH else [0] * len(reqs)
        a, b = fit
        draft = 0.0  # a draft engine's seconds per draft step at this batch
        if self.config.method == "draft":
            d = self.draft_step.fit(flat=True)
            draft = (d[0] + d[1] * len(reqs)) if d else 0.0
        if self.padded:
            return self._plan_padded(states, room, a, b, draft)
        tokens = float(len(reqs))  # expected tokens of the step
        seconds = a + b * len(reqs)
        per_draft = b + draft / max(len(reqs), 1)
        ks = [0] * len(reqs)
        # candidates (value, request): draft j of request i is worth alpha_i^j
        cand = sorted(((s.alpha ** j, i) for i, s in enumerate(states)
                       for j in range(1, room[i] + 1)), reverse=True)
        for value, i in cand:
            if value * seconds <= per_draft * tokens:  # value / cost below the step's rate
                break
            ks[i] += 1
            tokens += value
            seconds += per_draft
        return ks

    @staticmethod
    def _plan_padded(states: list[SpecState], room: list[int], a: float, b: float,
                     draft: float) -> list[int]:
        """A backend that lays the step out as sequences x longest chunk (the CPU fast path)
        pays a row per sequence for each step of depth: one depth D for the whole batch, the
        one with the best expected tokens per second."""
        n = len(states)
        best, best_rate = 0, n / (a + b * n)
        for depth in range(1, max(room, default=0) + 1):
            gain = sum(s.alpha ** j for s, r in zip(states, room, strict=True)
                       for j in range(1, min(depth, r) + 1))
            rate = (n + gain) / (a + b * n * (1 + depth) + draft * depth)
            if rate > best_rate:
                best, best_rate = depth, rate
        return [min(best, r) for r in room]

    # ---- after the step -------------------------------------------------------------------
    def step_done(self, rows: int, seconds: float) -> None:
        """A step's time (the draft engine's round taken out: it is fitted apart) and its
        rows: tokens, or sequences x longest chunk when padded."""
        self.cost.add(rows, seconds - self.draft_seconds)
        self.draft_seconds = 0.0

    def verified(self, req: Request, proposed: int, accepted: int, emitted: int) -> None:
        s = self.state(req)
        s.proposed += proposed
        s.accepted += accepted
        s.steps += 1
        s.alpha = (1 - _EMA) * s.alpha + _EMA * (accepted / proposed)
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        self.stats.steps += 1
        self.stats.emitted += emitted
