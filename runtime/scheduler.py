"""In-flight batching: each step is one flat batch of prefill chunks and decode tokens.

A request is a token list and a count of how many of its leading tokens have KV in the cache
(`num_computed`). A step gives each scheduled request a slice `[num_computed, +n)` to compute;
when the slice reaches the end of the list the step also samples the request's next token.
Prefill, chunked prefill and decode are thus the same thing with different `n`, which is what
lets them share one batch.

Order within a step: running decodes first (one token each, so a long prompt never stalls
them), then running requests part-way through their prompt, then waiting requests by
(priority, arrival). Budgets: `max_batch_tokens` tokens and `max_num_seqs` sequences, and
where the backend lays the step out as [sequences, longest chunk] query rows (the CPU fast
path's attention), `max_padded_rows` bounds sequences x longest chunk: a long prompt joining
many decodes is then prefilled in chunks that fit beside them, instead of padding every decode
to its length (63 decodes + a 2,000-token prompt would be 128,000 query rows).

Speculative drafts ride in their decode's chunk but only get what real tokens leave: budget and
padded rows past the other decodes' one token each, and KV slots claimed after every real
token has its own, from free blocks only (speculation never preempts anyone).

When the KV cache runs out, the scheduler preempts by recomputation: the running request
that is least important (lowest priority, then most recently admitted) gives up its blocks and
goes back to the front of the waiting queue with its generated tokens kept; re-admission
recomputes their KV (from the prefix cache where blocks survived). A request that cannot fit
even alone in the cache is finished instead of retried forever.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from llm_engine.runtime.block_manager import BlockManager
from llm_engine.runtime.request import Request, Status


@dataclass
class Chunk:
    req: Request
    start: int  # first position computed in this step
    num_tokens: int
    sample: bool  # the chunk reaches the end of the request's tokens: sample its next token
    prompt_logits: bool  # all rows' logits are wanted (prompt logprobs)
    # speculative decoding: proposed tokens scored after the request's last token; every row
    # then has logits, and how many drafts are kept is decided after the step (`accept`)
    draft: list[int] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.req.all_ids[self.start:self.start + self.num_tokens - len(self.draft)] \
            + self.draft

    @property
    def all_rows(self) -> bool:
        return self.prompt_logits or bool(self.draft)


@dataclass
class SchedulerOutput:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # ended by the scheduler itself
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class SchedulerConfig:
    max_batch_tokens: int = 2048
    max_num_seqs: int = 64
    max_seq_len: int = 8192
    max_padded_rows: int | None = None  # sequences x longest chunk of a step, if bounded


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        if config.max_batch_tokens < 1 or config.max_num_seqs < 1:
            raise ValueError("max_batch_tokens and max_num_seqs must be >= 1")
        if config.max_padded_rows is not None and config.max_padded_rows < config.max_num_seqs:
            raise ValueError("max_padded_rows must be >= max_num_seqs (a decode step of "
                             "max_num_seqs sequences needs that many rows)")
        self.config = config
        self.blocks = blocks
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._seq = itertools.count()
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.id in self.requests:
            raise ValueError(f"request id {req.id!r} is already in use")
        req.seqno = next(self._seq)
        req.status = Status.WAITING
        self.requests[req.id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return None
        self.finish(req, "abort")
        return req

    def finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """End a request: frees its blocks at once and drops it from the queues."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        self.blocks.free(req.id)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        self.requests.pop(req.id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_batch_tokens
        scheduled: set[str] = set()
        decoding = [r for r in self.running if len(r.all_ids) - r.num_computed == 1]
        prefilling = [r for r in self.running if len(r.all_ids) - r.num_computed > 1]
        cap = self.config.max_padded_rows
        for i, req in enumerate(decoding + prefilling):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            drafts: list[int] = []
            if i < len(decoding) and req.draft_ids:
                # Drafts get only what the real tokens of the decodes after this one leave:
                # a token of the budget and (all sharing a longest chunk) a padded row each.
                k = min(len(req.draft_ids), budget - (len(decoding) - i))
                if cap is not None:
                    k = min(k, cap // len(decoding) - 1)
                drafts = req.draft_ids[:max(k, 0)]
            n = self._fit(out, min(len(req.all_ids) - req.num_computed + len(drafts), budget))
            if n == 0:
                continue
            drafts = drafts[:n - 1]
            # The drafts' slots are claimed once every real token has its own (below).
            if not self._grow(req, n - len(drafts), scheduled, out):
                continue
            scheduled.add(req.id)
            budget -= n
            out.chunks.append(self._chunk(req, n, drafts))
        for c in out.chunks:
            if c.draft and not self.blocks.allocate_slots(c.req.id, c.start + c.num_tokens):
                # Speculation never preempts: without free blocks for them, a plain decode.
                # (Their budget is not handed on: with no block free, admission waits too.)
                c.num_tokens -= len(c.draft)
                c.draft = []
        if not out.preempted:  # admitting while preempting would just thrash
            budget = self._admit(budget, out)
        out.copies = self.blocks.take_copies()
        return out

    def _fit(self, out: SchedulerOutput, n: int) -> int:
        """How many of n tokens one more chunk may take under `max_padded_rows` (0: none)."""
        cap = self.config.max_padded_rows
        if cap is None:
            return n
        seqs = len(out.chunks) + 1
        longest = max((c.num_tokens for c in out.chunks), default=0)
        room = cap // seqs
        return 0 if room < longest else min(n, room)

    def _chunk(self, req: Request, n: int, draft: list[int] | None = None) -> Chunk:
        end = req.num_computed + n - len(draft or ())
        return Chunk(req, req.num_computed, n, sample=end == len(req.all_ids),
                     prompt_logits=req.wants_prompt_logprobs() and req.num_computed < req.num_prompt,
                     draft=list(draft or ()))

    def _grow(self, req: Request, n: int, scheduled: set[str], out: SchedulerOutput) -> bool:
        """Get slots for n more tokens of a running request, preempting others if needed."""
        while not self.blocks.allocate_slots(req.id, req.num_computed + n):
            # The least important request not yet scheduled gives up its blocks, and that can
            # be req itself: a low-priority request must not evict a more important one.
            victims = [r for r in self.running if r.id not in scheduled]
            victim = max(victims, key=lambda r: (r.priority, r.seqno))
            if victim is req:
                if len(self.running) == 1:  # alone and still no room: the cache is too small
                    self.finish(req, "length")
                    out.finished.append(req)
                else:  # the others are more important or hold blocks scheduled this step
                    self._preempt(req, out)
                return False
            self._preempt(victim, out)
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.blocks.free(req.id)
        req.num_computed = 0
        if req.wants_prompt_logprobs():
            # Recomputation starts over at position 0 and yields these rows again: drop the
            # partial rows, or the engine would append them a second time.
            del req.prompt_logprobs[1:]
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)
        out.preempted.append(req)

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        self.waiting.sort(key=lambda r: (r.priority, r.seqno))
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            # A preempted request only needs room for the tokens it has (as in _grow): one that
            # ran up to the cache's size must resume, or stop with "length", not fail.
            need = len(req.all_ids) + (0 if req.num_output else 1)
            if self.blocks.blocks_for(need) > self.blocks.num_blocks:
                if req.num_output:
                    self.finish(req, "length")
                else:
                    self.finish(req, "error", error=(
                        f"the request needs {len(req.all_ids) + 1} tokens of KV cache but the "
                        f"whole cache holds {self.blocks.num_blocks * self.blocks.block_size}; "
                        "raise --kv-cache-memory or shorten the prompt"))
                out.finished.append(req)
                continue
            n = self._fit(out, min(len(req.all_ids), budget))
            if n == 0:
                break
            # Prompt logprobs need every prompt row's logits, so hits cannot skip them.
            use_cache = req.params.prompt_logprobs is None
            cached = self.blocks.allocate_prompt(req.id, req.all_ids, n, use_cache=use_cache,
                                                 salt=req.cache_salt)
            if cached is None:
                break  # head-of-line waits for blocks; later arrivals do not jump it
            if req.num_preemptions == 0:
                req.num_cached_tokens = cached
            req.num_computed = cached
            n = min(n, len(req.all_ids) - cached)
            self.waiting.pop(0)
            req.status = Status.RUNNING
            self.running.append(req)
            budget -= n
            out.chunks.append(self._chunk(req, n))
        return budget

    def update(self, out: SchedulerOutput) -> None:
        """After the step ran: the chunks' KV is written; publish full blocks to the cache."""
        for chunk in out.chunks:
            req = chunk.req
            if req.finished:
                continue
            # A speculative chunk's drafts count once verified (`accept`).
            req.num_computed = chunk.start + chunk.num_tokens - len(chunk.draft)
            self.blocks.commit(req.id, req.all_ids, req.num_computed)

    def accept(self, req: Request, num_accepted: int) -> None:
        """After verification: the first `num_accepted` drafts of the request's chunk were
        kept (their KV stays); the slots of the rejected ones are given back."""
        if req.finished:
            return
        req.num_computed += num_accepted
        self.blocks.truncate(req.id, req.num_computed)
        self.blocks.commit(req.id, req.all_ids, req.num_computed)
