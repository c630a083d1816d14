"""A step's grammar masks, filled while the forward pass runs.

The masks a step needs depend only on tokens already sampled, so they are known before the
model runs: the engine starts the fill on a worker thread (llguidance releases the GIL, and
so does the forward pass), then waits for it once the logits are back. One bitmask covers the
step: a row per sampled chunk, plus a row per draft token of a speculative chunk;
unconstrained rows stay all-ones and cost nothing beyond the one where().
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_engine.runtime.structured.matcher import allocate_bitmask, apply_bitmask, fill_bitmasks


@dataclass
class StepMasks:
    bitmask: torch.Tensor                    # [rows, words], all-ones where unconstrained
    first_row: dict[int, int]                # chunk index -> its first mask row
    constrained: set[int]                    # chunk indices whose request has a grammar
    vocab_size: int
    fill: Future | None = field(default=None, repr=False)

    def wait(self) -> None:
        """Blocks until the fill is done; re-raises its error. Must run before any matcher
        of the step is advanced (the fill reads them)."""
        if self.fill is not None:
            fill, self.fill = self.fill, None
            fill.result()

    def chunk(self, index: int, logits: torch.Tensor) -> torch.Tensor:
        """A speculative chunk's rows [K + 1, V], masked position by position."""
        if index not in self.constrained:
            return logits
        self.wait()
        start = self.first_row[index]
        return apply_bitmask(logits, self.bitmask[start:start + logits.shape[0]],
                             self.vocab_size)

    def sampled(self, indices: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """The step's sampled rows [N, V] (one per chunk in `indices`), masked where their
        request is constrained: one where() over the batch."""
        if not self.constrained.intersection(indices):
            return logits
        self.wait()
        rows = self.bitmask[torch.tensor([self.first_row[i] for i in indices])]
        return apply_bitmask(logits, rows, self.vocab_size,
                             [i in self.constrained for i in indices])


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    # One thread for the process: it only hands batches to llguidance's own pool.
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-engine-masks")
    return _POOL


def start_step_masks(chunks: Sequence[Any]) -> StepMasks | None:
    """Lays out and starts filling the masks of a step's chunks (scheduler Chunks) on a
    worker thread. None when no chunk that samples has a grammar."""
    first_row: dict[int, int] = {}
    entries = []
    rows = 0
    for i, c in enumerate(chunks):
        if not c.sample:
            continue
        first_row[i] = rows
        drafts = list(c.draft or ())
        if c.req.matcher is not None:
            entries.append((i, c.req.matcher, rows, drafts))
        rows += 1 + len(drafts)
    if not entries:
        return None
    vocab = {m.vocab_size for _, m, _, _ in entries}
    if len(vocab) > 1:
        raise ValueError(f"constrained requests of one step must share a vocabulary, "
                         f"got sizes {sorted(vocab)}")
    bitmask = allocate_bitmask(rows, vocab_size := vocab.pop())
    fill = _pool().submit(fill_bitmasks, [(m, row, d) for _, m, row, d in entries], bitmask)
    return StepMasks(bitmask, first_row, {i for i, *_ in entries}, vocab_size, fill)
