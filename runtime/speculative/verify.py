"""Verification: which proposed tokens the target model keeps, and the token after them.

The target scored the request's last token and its K drafts in one chunk, so row i of its
logits is the target's distribution p_i for the token after draft i (row 0: after the last
real token). Tokens are decided row by row, each through the request's own sampler state
(penalties, min_tokens, temperature, filters, seed), exactly as plain decoding would decide
them, and handed to `emit` one at a time, which applies stop checks and may end the request:

* a draft proposed as a single token (prompt lookup, a greedy draft model: q is a point
  mass) is kept iff the token the target samples at its row *is* that draft. Sampling from
  p and comparing is the rejection rule of Leviathan et al. (2023) for a point-mass q:
  accept with probability p(d) / 1, and on rejection the sample is distributed as p
  without d, renormalized. Greedy requests take the argmax, so greedy output is identical
  to decoding without speculation.
* a draft sampled from a distribution q (a draft model at temperature > 0) is kept with
  probability min(1, p(d) / q(d)); on rejection the token is drawn from
  normalize(max(0, p - q)). Either way the kept token is distributed as p.
* if every draft is kept, the last row gives one more token (the bonus).

Draws use the request's generator when it has a seed, so a seeded request reproduces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llm_engine.runtime.sampling import (
    Sample,
    SamplerState,
    _exponentials,
    _plain_greedy,
    process_logits,
    raw_sample,
    sample,
)

# emit(sample) -> True while the request goes on (False: it stopped at this token)
Emit = Callable[[Sample], bool]


def verify(rows: torch.Tensor, drafts: Sequence[int], q: torch.Tensor | None,
           state: SamplerState, emit: Emit) -> int:
    """Decide the tokens of one speculative chunk: `rows` [K + 1, V] the target's logits,
    `drafts` the K proposed tokens, `q` [K, V] the probabilities they were drawn from (None:
    each was proposed as a single token). Emits 1 to K + 1 tokens; returns how many drafts
    were kept."""
    k = len(drafts)
    if rows.shape[0] != k + 1:
        raise ValueError(f"verify: {rows.shape[0]} logits rows for {k} drafts")
    if q is None and _plain_greedy(state) and rows.dtype == torch.float32 \
            and rows.device.type == "cpu":
        # The common greedy case: one argmax over all rows.
        best = rows.numpy().argmax(axis=-1).tolist()
        for i in range(k + 1):
            going = emit(Sample(best[i], None))
            if i == k or best[i] != drafts[i]:
                return i  # the bonus token, or the target's correction of draft i
            if not going:
                return i + 1
            if not _plain_greedy(state):  # a token can change that (min_tokens reached)
                return i + 1 + _verify_rows(rows[i + 1:], drafts[i + 1:], None, state, emit)
        return k
    return _verify_rows(rows, drafts, q, state, emit)


def _verify_rows(rows: torch.Tensor, drafts: Sequence[int], q: torch.Tensor | None,
                 state: SamplerState, emit: Emit) -> int:
    for i, d in enumerate(drafts):
        row = rows[i:i + 1]
        if q is None or state.params.greedy:
            s = sample(row, [state])[0]
            kept = s.token_id == d
        else:
            s, kept = _rejection(row, d, q[i], state)
        if not emit(s) or not kept:
            return i + int(kept)
    emit(sample(rows[len(drafts):], [state])[0])
    return len(drafts)


def _rejection(row: torch.Tensor, d: int, q: torch.Tensor, state: SamplerState
               ) -> tuple[Sample, bool]:
    """The kept token at one row for a draft d drawn from q: (sample, whether it is d)."""
    p = process_logits(row, [state])[0].softmax(dim=-1)
    q = q.to(p)
    ratio = float(p[d]) / max(float(q[d]), 1e-30)
    u = torch.rand(1, generator=state.generator, device=state.generator.device
                   if state.generator is not None else p.device)
    if float(u) < min(1.0, ratio):
        return raw_sample(row[0], d, state.params.logprobs), True
    residual = (p - q).clamp_min_(0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is exact
        residual = p
    token = int((residual / _exponentials((1, residual.shape[0]), [state], p.device)[0])
                .argmax())
    return raw_sample(row[0], token, state.params.logprobs), False
