"""Token sampling: per-request state and one vectorised step over a batch.

The parameters a request carries (`SamplingParams` and its checks) are in
runtime.sampling_params; this module turns them into tokens and logprobs.

Semantics follow vLLM so that requests written for it behave the same here:

* processing order: penalties -> min_tokens mask -> temperature -> top_k -> top_p -> min_p -> draw;
* repetition_penalty (HF/vLLM) applies to tokens seen in the prompt or the output, presence and
  frequency penalties (OpenAI) to output tokens only;
* the returned logprobs are those of the raw model distribution (log_softmax of the fp32 logits),
  not of the processed one;
* random rows draw with the exponential race, argmax(probs / q) with q ~ Exp(1), which needs no
  cumsum/searchsorted and lets every seeded row draw its q from its own generator: a seeded
  request then produces the same tokens alone or in any batch, in any row position.

The seeded stream depends on the generator's device (CPU and CUDA generators differ), so a seed
reproduces results on the same kind of device only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from llm_engine.runtime.sampling_params import SamplingParams

# Rows of prompt logits converted to fp32 at a time, so a long prompt never needs a [T, V] fp32
# copy (4k tokens x 152k vocab would be 2.4 GB).
_PROMPT_CHUNK = 256


@dataclass(slots=True)
class Sample:
    token_id: int
    # of token_id under the raw model distribution; None when no request of the step asked
    # for logprobs (a log-sum-exp over the vocabulary costs ~0.1 ms a step, cache-cold)
    logprob: float | None
    # Top-N raw logprobs (highest first) plus token_id; None when logprobs were not requested.
    top_logprobs: dict[int, float] | None = None


class SamplerState:
    """What the sampler needs to remember about one request between steps."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int],
                 eos_token_ids: int | Iterable[int] | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.params = params
        self.prompt_ids = list(prompt_ids)
        if eos_token_ids is None:
            eos_token_ids = ()
        elif isinstance(eos_token_ids, int):
            eos_token_ids = (eos_token_ids,)
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.output_ids: list[int] = []
        # Tokens banned while len(output) < min_tokens: those that would end the request. With
        # ignore_eos the EOS does not end it, so it stays allowed (as in vLLM).
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        self.min_tokens_stop_ids: tuple[int, ...] = tuple(sorted(stop_ids))
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        # Dense [V] penalty tables on the logits' device, built on the first step (V is unknown
        # until then) and updated in O(1) per token, so a step never rescans the token lists;
        # only requests that use the penalty get one.
        self._use_seen = params.repetition_penalty != 1.0
        self._use_counts = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        # uint8 rather than bool: torch.stack of bool tensors takes a far slower path on CPU.
        self._seen: torch.Tensor | None = None  # 1 = in prompt or output
        self._counts: torch.Tensor | None = None  # fp32: occurrences in output

    @property
    def penalized(self) -> bool:
        return self._use_seen or self._use_counts

    def append(self, token_id: int) -> None:
        """Record a generated token (call once per step with the token that was kept)."""
        self.output_ids.append(token_id)
        if self._seen is not None:
            self._seen[token_id] = 1
        if self._counts is not None:
            self._counts[token_id] += 1

    def _penalty_tables(self, vocab: int, device: torch.device
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self._use_seen and self._seen is None:
            self._seen = torch.zeros(vocab, dtype=torch.uint8, device=device)
            # A prompt may hold ids the model cannot emit (added tokens past its vocabulary).
            ids = [t for t in self.prompt_ids if t < vocab] + self.output_ids
            if ids:
                self._seen[torch.tensor(ids, device=device)] = 1
        if self._use_counts and self._counts is None:
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            if self.output_ids:
                self._counts.index_add_(0, torch.tensor(self.output_ids, device=device),
                                        torch.ones(len(self.output_ids), device=device))
        return self._seen, self._counts


def _rows(idx: list[int], n: int, device: torch.device) -> torch.Tensor | None:
    """Index tensor for a row subset, or None when it is every row (no gather/scatter needed)."""
    return None if len(idx) == n else torch.tensor(idx, device=device)


def _apply_penalties(x: torch.Tensor, states: Sequence[SamplerState]) -> None:
    rows = [i for i, s in enumerate(states) if s.penalized]
    if not rows:
        return
    vocab, dev = x.shape[1], x.device
    sel = _rows(rows, x.shape[0], dev)
    sub = x if sel is None else x[sel]
    ps = [states[i].params for i in rows]
    tables = [states[i]._penalty_tables(vocab, dev) for i in rows]
    if any(p.repetition_penalty != 1.0 for p in ps):
        zeros_b = torch.zeros(vocab, dtype=torch.uint8, device=dev)
        seen = torch.stack([t[0] if t[0] is not None else zeros_b for t in tables]).bool()
        rp = torch.tensor([p.repetition_penalty for p in ps], device=dev)[:, None]
        # Dividing a positive logit and multiplying a negative one both make the token less likely.
        sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in ps):
        zeros_f = torch.zeros(vocab, dtype=torch.float32, device=dev)
        counts = torch.stack([t[1] if t[1] is not None else zeros_f for t in tables])
        freq = torch.tensor([p.frequency_penalty for p in ps], device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in ps], device=dev)[:, None]
        sub = sub - freq * counts - pres * (counts > 0)
    if sel is None:
        x.copy_(sub)
    else:
        x[sel] = sub


def _mask_min_tokens(x: torch.Tensor, states: Sequence[SamplerState]) -> None:
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        if len(s.output_ids) < s.params.min_tokens:
            ids = [t for t in s.min_tokens_stop_ids if t < x.shape[1]]
            rows += [i] * len(ids)
            cols += ids
    if rows:
        x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = -math.inf


def _filter(y: torch.Tensor, ps: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top_k, top_p, min_p on random rows `y` (modified; the result may be a new
    tensor), each only if some row uses it. Filtered-out tokens become -inf."""
    vocab = y.shape[1]
    dev = y.device
    if any(p.temperature != 1.0 for p in ps):
        y.div_(torch.tensor([p.temperature for p in ps], device=dev)[:, None])

    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in ps]
    use_k = any(k < vocab for k in ks)
    use_p = any(p.top_p < 1.0 for p in ps)
    if use_p:
        # top_k is a cut at a rank and top_p a cut on the mass in rank order, so one ranking
        # serves both. When every top_p row also has a top_k, no token past the largest k can
        # survive and a topk replaces the full sort (the usual top_k + top_p request: the sort
        # of a 150k vocabulary dominates a CPU step).
        full = any(p.top_p < 1.0 and k >= vocab for p, k in zip(ps, ks))
        if full:
            vals, idx = y.sort(dim=-1, descending=True)
        else:
            vals, idx = y.topk(max(k for k in ks if k < vocab), dim=-1)
        if use_k:
            k = torch.tensor(ks, device=dev)[:, None]
            vals.masked_fill_(torch.arange(vals.shape[1], device=dev)[None, :] >= k, -math.inf)
        probs = vals.softmax(dim=-1)
        # A token goes once the tokens ranked above it already hold top_p of the mass; the top
        # token always stays. Rows with top_p == 1 get an unreachable bound so fp32 rounding
        # in the cumsum cannot drop their tail.
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else math.inf for p in ps], device=dev)
        vals.masked_fill_(probs.cumsum(dim=-1) - probs >= top_p[:, None], -math.inf)
        if full:
            y.scatter_(1, idx, vals)
        else:
            cut = torch.full_like(y, -math.inf).scatter_(1, idx, vals)
            if all(k < vocab for k in ks):
                y = cut
            else:  # rows with no top_k have no top_p either here: they keep the whole row
                no_k = torch.tensor([k >= vocab for k in ks], device=dev)[:, None]
                y = torch.where(no_k, y, cut)
    elif use_k:
        kmax = max(k for k in ks if k < vocab)
        top = y.topk(kmax, dim=-1).values
        k = torch.tensor([min(kk, kmax) for kk in ks], device=dev)[:, None]
        kth = top.gather(1, k - 1)
        # Rows without top_k keep everything.
        kth.masked_fill_(torch.tensor([kk >= vocab for kk in ks], device=dev)[:, None],
                         -math.inf)
        # Ties with the k-th value stay: which of equal logits to drop would be arbitrary.
        y.masked_fill_(y < kth, -math.inf)
    if any(p.min_p > 0.0 for p in ps):
        # p_i >= min_p * p_max  <=>  l_i >= l_max + log(min_p): no softmax needed, and
        # log(0) = -inf leaves rows without min_p untouched. The log is taken in float64:
        # a min_p below float32's range (e.g. 1e-57) would round to 0 and disable the filter.
        log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf
                                  for p in ps], device=dev)[:, None]
        y.masked_fill_(y < y.max(dim=-1, keepdim=True).values + log_min_p, -math.inf)
    return y


def _exponentials(shape: tuple[int, int], states: Sequence[SamplerState],
                  device: torch.device) -> torch.Tensor:
    q = torch.empty(shape, dtype=torch.float32, device=device)
    unseeded = [i for i, s in enumerate(states) if s.generator is None]
    if len(unseeded) == len(states):
        q.exponential_()
    elif unseeded:
        q[torch.tensor(unseeded, device=device)] = torch.empty(
            (len(unseeded), shape[1]), device=device).exponential_()
    for i, s in enumerate(states):
        g = s.generator
        if g is None:
            continue
        if g.device == q.device:
            q[i].exponential_(generator=g)
        else:  # a generator made for another device keeps its own stream
            q[i] = torch.empty(shape[1], device=g.device).exponential_(generator=g)
    # Exp(1) draws can underflow to 0; 0/0 would give NaN, which argmax would pick.
    return q.clamp_min_(torch.finfo(torch.float32).tiny)


def _check(logits: torch.Tensor, states: Sequence[SamplerState]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be [N, V] with N = len(states) = {len(states)}, "
                         f"got {list(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def process_logits(logits: torch.Tensor, states: Sequence[SamplerState]) -> torch.Tensor:
    """The fp32 logits that `sample` draws from, for every row (penalties, min_tokens mask,
    temperature and filters; filtered-out tokens are -inf). Greedy rows get no temperature or
    filters: `sample` takes their argmax. For inspection and tests; `sample` does not call it."""
    _check(logits, states)
    x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    _apply_penalties(x, states)
    _mask_min_tokens(x, states)
    rand = [i for i, s in enumerate(states) if not s.params.greedy]
    if rand:
        sel = _rows(rand, len(states), x.device)
        y = x if sel is None else x[sel]
        y = _filter(y, [states[i].params for i in rand])
        if sel is None:
            x = y
        else:
            x[sel] = y
    return x


def _plain_greedy(s: SamplerState) -> bool:
    """Argmax of the raw logits: greedy, no penalties, past min_tokens, no logprobs."""
    return (s.params.greedy and not s.penalized and s.params.logprobs is None
            and len(s.output_ids) >= s.params.min_tokens)


def sample(logits: torch.Tensor, states: Sequence[SamplerState]) -> list[Sample]:
    """Pick one token per row of `logits` [N, V] (any float dtype) for the requests `states`.

    Does not modify `logits` or the states: call `state.append(token)` for the tokens kept."""
    _check(logits, states)
    if all(_plain_greedy(s) for s in states):
        # The common decode step, with nothing to adjust: no copy of the logits at all (each
        # vocabulary-wide op costs ~0.05-0.1 ms once the model has flushed the caches).
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy's argmax is vectorized; torch's CPU argmax takes ~15x longer (65 us for
            # one row of a 49k vocabulary on one thread). Ties: both take the first.
            return [Sample(t, None) for t in logits.numpy().argmax(axis=-1).tolist()]
        return [Sample(t, None) for t in logits.argmax(dim=-1).tolist()]
    n, vocab = logits.shape
    dev = logits.device
    x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)

    # Logprobs report the raw distribution, so take what they need before x is processed.
    wanted = any(s.params.logprobs is not None for s in states)
    lse = torch.logsumexp(x, dim=-1) if wanted else None
    lp_rows = [i for i, s in enumerate(states) if s.params.logprobs]
    top = None
    if lp_rows:
        lp_sel = _rows(lp_rows, n, dev)
        kmax = min(max(states[i].params.logprobs or 0 for i in lp_rows), vocab)
        raw = x if lp_sel is None else x[lp_sel]
        vals, ids = raw.topk(kmax, dim=-1)
        top = (vals - (lse if lp_sel is None else lse[lp_sel])[:, None], ids)

    _apply_penalties(x, states)
    _mask_min_tokens(x, states)

    tokens = torch.empty(n, dtype=torch.long, device=dev)
    greedy = [i for i, s in enumerate(states) if s.params.greedy]
    rand = [i for i, s in enumerate(states) if not s.params.greedy]
    if greedy:
        sel = _rows(greedy, n, dev)
        if sel is None:
            tokens = x.argmax(dim=-1)
        else:
            tokens[sel] = x[sel].argmax(dim=-1)
    if rand:
        sel = _rows(rand, n, dev)
        y = x if sel is None else x[sel]
        rand_states = [states[i] for i in rand]
        y = _filter(y, [s.params for s in rand_states])
        probs = y.softmax(dim=-1)
        drawn = probs.div_(_exponentials(tuple(probs.shape), rand_states, dev)).argmax(dim=-1)
        if sel is None:
            tokens = drawn
        else:
            tokens[sel] = drawn

    # Results leave the device only here, so a GPU step syncs once.
    token_list = tokens.tolist()
    chosen_list: list[float | None] = [None] * n
    if lse is not None:  # the chosen token's raw logit, read from the input: exact in fp32
        chosen_list = (logits.gather(1, tokens[:, None]).squeeze(1).float() - lse).tolist()
    out = [Sample(t, lp) for t, lp in zip(token_list, chosen_list)]
    if top is not None:
        top_vals, top_ids = top[0].tolist(), top[1].tolist()
        for j, i in enumerate(lp_rows):
            k = states[i].params.logprobs or 0
            top_lp = dict(zip(top_ids[j][:k], top_vals[j][:k]))
            top_lp.setdefault(out[i].token_id, out[i].logprob)
            out[i].top_logprobs = top_lp
    for i, s in enumerate(states):
        if s.params.logprobs == 0:  # vLLM: 0 means the sampled token's logprob only
            out[i].top_logprobs = {out[i].token_id: out[i].logprob}
    return out


def raw_sample(row: torch.Tensor, token: int, logprobs: int | None) -> Sample:
    """A Sample for a token decided outside `sample` (speculative verification): its raw
    logprob and top-`logprobs` as `sample` reports them, or none when none were asked for."""
    if logprobs is None:
        return Sample(token, None)
    x = row.float()
    lse = torch.logsumexp(x, dim=-1)
    lp = float(x[token] - lse)
    top: dict[int, float] = {token: lp}
    if logprobs:
        vals, ids = x.topk(min(logprobs, x.shape[-1]))
        top = dict(zip(ids.tolist(), (vals - lse).tolist()))
        top.setdefault(token, lp)
    return Sample(token, lp, top)


def prompt_logprobs_for(logits_rows: torch.Tensor, next_ids: Sequence[int],
                        n: int) -> list[Sample]:
    """Raw logprobs for prompt positions: row t of `logits_rows` [T, V] is the model's output at
    a prompt position and `next_ids[t]` the prompt token that follows it. Returns one Sample per
    row: the actual token, its logprob and the top-n (plus the actual token) in top_logprobs."""
    if logits_rows.dim() != 2 or logits_rows.shape[0] != len(next_ids):
        raise ValueError(f"logits_rows must be [T, V] with T = len(next_ids) = {len(next_ids)}, "
                         f"got {list(logits_rows.shape)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    t_all, vocab = logits_rows.shape
    k = min(n, vocab)
    out: list[Sample] = []
    ids_all = torch.tensor(list(next_ids), dtype=torch.long, device=logits_rows.device)
    for start in range(0, t_all, _PROMPT_CHUNK):
        x = logits_rows[start:start + _PROMPT_CHUNK].float()
        lse = torch.logsumexp(x, dim=-1)
        ids = ids_all[start:start + _PROMPT_CHUNK]
        lp = (x.gather(1, ids[:, None]).squeeze(1) - lse).tolist()
        top = x.topk(k, dim=-1)  # k = 0 gives empty rows
        vals, idx = (top.values - lse[:, None]).tolist(), top.indices.tolist()
        for j, (tok, tok_lp) in enumerate(zip(ids.tolist(), lp)):
            top_lp = dict(zip(idx[j], vals[j]))
            top_lp.setdefault(tok, tok_lp)
            out.append(Sample(tok, tok_lp, top_lp))
    return out
