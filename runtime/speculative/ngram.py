"""Prompt lookup: propose the tokens that followed the last occurrence of the sequence's
current suffix, within its own prompt and output (no second model).

Answers that quote their prompt (summaries, code edits, RAG answers) repeat runs of it; when
the last n tokens occurred before, what followed them then is a good guess for what follows
now. Longer matches are tried first (n from `n_max` down to `n_min`), and the most recent
occurrence wins.

Each request keeps an index per n: n-gram -> the position right after its latest earlier
occurrence, extended as tokens arrive (amortized O(n_max) per token), so a proposal never
rescans the sequence. Its size grows with the sequence, which max_seq_len bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NgramIndex:
    n_min: int
    n_max: int
    tokens: list[int] = field(default_factory=list)
    # n -> {n-gram: position right after its latest occurrence whose continuation is known}
    _seen: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"ngram sizes must satisfy 1 <= min <= max, got {self.n_min}, "
                             f"{self.n_max}")
        self._seen = {n: {} for n in range(self.n_min, self.n_max + 1)}

    def extend(self, tokens: list[int]) -> None:
        """Bring the index up to `tokens` (the sequence so far; it only grows, except that a
        sequence whose tokens no longer match what was indexed is re-indexed)."""
        have = len(self.tokens)
        if len(tokens) < have or tokens[max(0, have - self.n_max):have] != \
                self.tokens[max(0, have - self.n_max):]:
            self.__post_init__()
            self.tokens, have = [], 0
        for pos in range(have, len(tokens)):
            # the n-grams ending just before `pos` now have a known continuation at pos
            for n in range(self.n_min, self.n_max + 1):
                if pos >= n:
                    self._seen[n][tuple(tokens[pos - n:pos])] = pos
        self.tokens.extend(tokens[have:])

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the longest suffix seen before (empty: no match)."""
        toks = self.tokens
        for n in range(self.n_max, self.n_min - 1, -1):
            if len(toks) <= n:
                continue
            at = self._seen[n].get(tuple(toks[-n:]))
            if at is not None:
                return toks[at:at + k]
        return []
