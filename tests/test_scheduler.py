"""runtime.scheduler: budgets, ordering, preemption and termination under random load.

The scheduler is driven the way `Engine.step` drives it (schedule -> run the chunks -> update ->
sample -> finish), with a fake model in place of the executor: "running" a chunk writes, into a
shadow of the KV cache, the prefix each slot's KV would be computed from, and "sampling" appends
a random token. So the tests see what a real step would do to the cache, without torch.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llm_engine.runtime.block_manager import BlockManager
from llm_engine.runtime.request import FINISH_REASONS, Request, Status
from llm_engine.runtime.sampling_params import SamplingParams
from llm_engine.runtime.scheduler import Chunk, Scheduler, SchedulerConfig, SchedulerOutput

VOCAB = 4  # few symbols: prompts and outputs share prefixes, so the prefix cache hits
MAX_LIVE = 8  # requests queued or running at once


def _request(rid: str, prompt: list[int], max_tokens: int = 16, priority: int = 0,
             prompt_logprobs: int | None = None) -> Request:
    """A request as Engine.add_request builds it, minus the sampler and detokenizer."""
    params = SamplingParams(max_tokens=max_tokens, prompt_logprobs=prompt_logprobs)
    req = Request(rid, list(prompt), params, len(prompt) + max_tokens, priority=priority)
    if prompt_logprobs is not None:
        req.prompt_logprobs = [None]  # the first prompt token has no prediction
    return req


def _sample(sched: Scheduler, out: SchedulerOutput, token: int | random.Random = 0,
            accepted: Callable[[int], int] | None = None) -> None:
    """Engine._run after the executor: speculative chunks' verification, prompt logprob rows,
    then one token per sampling chunk, finishing a request once it reaches its length limit
    (runtime.output.append_token). `accepted(k)`: how many of k drafts verification keeps."""

    def draw() -> int:
        return token.randrange(VOCAB) if isinstance(token, random.Random) else token

    for c in out.chunks:
        if not c.draft:
            continue
        # Engine._verify: the kept drafts, then the target's own token after them (a
        # correction of the first rejected draft, or the bonus), each through the stop checks.
        req = c.req
        kept = accepted(len(c.draft)) if accepted is not None else 0
        nxt = draw()
        if kept < len(c.draft) and nxt == c.draft[kept]:
            nxt = (nxt + 1) % VOCAB  # a correction differs from the draft it rejects
        for t in [*c.draft[:kept], nxt]:
            req.all_ids.append(t)
            if len(req.all_ids) >= req.max_total_tokens:
                sched.finish(req, "length")
                break
        sched.accept(req, kept)
    for c in out.chunks:
        req = c.req
        if c.prompt_logits:
            rows = min(c.num_tokens, req.num_prompt - 1 - c.start)
            req.prompt_logprobs.extend({} for _ in range(max(rows, 0)))
    for c in out.chunks:
        if not c.sample or c.draft:
            continue
        req = c.req
        req.all_ids.append(draw())
        if len(req.all_ids) >= req.max_total_tokens:
            sched.finish(req, "length")


def _step(sched: Scheduler, token: int | random.Random = 0) -> SchedulerOutput:
    out = sched.schedule()
    sched.update(out)
    _sample(sched, out, token)
    sched.blocks.check()
    return out


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sched: Scheduler | None = None
        self.bm: BlockManager
        self.rng: random.Random
        self.shadow: dict[int, list[tuple[int, ...] | None]] = {}
        self.reqs: list[Request] = []  # every request ever added, finished ones included
        # Set by every rule, cleared once the invariants after it pass: when a rule fails,
        # teardown must not drain the queue and bury that error under another.
        self.broken = False

    @property
    def bs(self) -> int:
        return self.bm.block_size

    @initialize(num_blocks=st.integers(4, 40), block_size=st.integers(1, 8),
                max_batch_tokens=st.integers(1, 64), max_num_seqs=st.integers(1, 8),
                prefix_caching=st.sampled_from([True, True, False]),
                padded_rows=st.one_of(st.none(), st.integers(0, 80)),
                rng=st.randoms(use_true_random=False))
    def setup(self, num_blocks: int, block_size: int, max_batch_tokens: int, max_num_seqs: int,
              prefix_caching: bool, padded_rows: int | None, rng: random.Random) -> None:
        self.broken = True
        self.bm = BlockManager(num_blocks, block_size, prefix_caching=prefix_caching)
        # The CPU fast path's bound on sequences x longest chunk (at least max_num_seqs).
        padded = None if padded_rows is None else max(padded_rows, max_num_seqs)
        self.sched = Scheduler(SchedulerConfig(max_batch_tokens=max_batch_tokens,
                                               max_num_seqs=max_num_seqs,
                                               max_padded_rows=padded), self.bm)
        self.rng = rng
        # Record who was still unscheduled at each preemption, to check the victim choice
        # (the moment is not visible from the step's output).
        self.victims: list[tuple[Request, list[Request]]] = []
        preempt = self.sched._preempt

        def spy(req: Request, out: SchedulerOutput) -> None:
            scheduled = {c.req.id for c in out.chunks}
            # Speculation never preempts: while anyone is preempted, no draft holds a slot
            # (drafts only get the blocks that no real token of the step needs).
            for c in out.chunks:
                assert len(self.bm.block_table(c.req.id)) == self.bm.blocks_for(
                    c.start + c.num_tokens - len(c.draft)), f"{req.id} preempted for drafts"
            self.victims.append((req, [r for r in self.sched.running if r.id not in scheduled]))
            preempt(req, out)

        self.sched._preempt = spy  # type: ignore[method-assign]
        # What each slot's KV was computed from (the prefix ending there). Freed blocks keep
        # their contents, so a wrong prefix-cache hit reads a foreign prefix.
        self.shadow = {b: [None] * block_size for b in range(num_blocks)}

    # ---- rules ----------------------------------------------------------------------------
    def _live(self) -> int:
        assert self.sched is not None
        return len(self.sched.waiting) + len(self.sched.running)

    def _add(self, prompt: list[int], priority: int, max_tokens: int,
             prompt_logprobs: int | None) -> None:
        assert self.sched is not None
        self.broken = True
        req = _request(f"r{len(self.reqs)}", prompt, max_tokens, priority, prompt_logprobs)
        self.sched.add(req)
        assert req.status is Status.WAITING and req in self.sched.waiting
        self.reqs.append(req)

    @precondition(lambda self: self._live() < MAX_LIVE)
    @rule(prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=60),
          priority=st.integers(0, 3), max_tokens=st.integers(1, 20),
          prompt_logprobs=st.sampled_from([None, None, None, 1]))
    def add(self, prompt: list[int], priority: int, max_tokens: int,
            prompt_logprobs: int | None) -> None:
        self._add(prompt, priority, max_tokens, prompt_logprobs)

    @precondition(lambda self: self.reqs and self._live() < MAX_LIVE)
    @rule(data=st.data(), tail=st.lists(st.integers(0, VOCAB - 1), max_size=8),
          priority=st.integers(0, 3), max_tokens=st.integers(1, 20))
    def add_shared_prefix(self, data: st.DataObject, tail: list[int], priority: int,
                          max_tokens: int) -> None:
        """A prompt starting with an earlier request's tokens (prompt and output): the prefix
        cache path, which independent random prompts reach too rarely."""
        base = self.reqs[data.draw(st.integers(0, len(self.reqs) - 1), label="base")].all_ids
        cut = data.draw(st.integers(1, len(base)), label="cut")
        self._add(base[:cut] + tail, priority, max_tokens, None)

    # (Stepping an idle scheduler proves nothing; without this precondition, examples where
    # hypothesis switched the add rules off would be all idle steps.)
    @precondition(lambda self: self.sched is not None and self.sched.has_unfinished())
    @rule()
    def step(self) -> None:
        self.broken = True
        self._step()

    @precondition(lambda self: self.sched is not None and self.sched.has_unfinished())
    @rule(data=st.data())
    def speculative_step(self, data: st.DataObject) -> None:
        """A step with drafts proposed (runtime.speculative): random draft lengths and random
        acceptance. Every request gets draft_ids, waiting and prefilling ones included: the
        scheduler must only use a decoding request's."""
        self.broken = True
        self._step(lambda lo, hi, label: data.draw(st.integers(lo, hi), label=label))

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        assert self.sched is not None
        self.broken = True
        req = self.reqs[data.draw(st.integers(0, len(self.reqs) - 1), label="req")]  # or finished
        reason = req.finish_reason
        got = self.sched.abort(req.id)
        if reason is None:
            assert got is req and req.finish_reason == "abort" and req.finished
            assert not self.bm.has(req.id)
        else:  # aborting a finished request is a no-op that keeps its real reason
            assert got is None and req.finish_reason == reason
        assert self.sched.abort("no-such-request") is None

    # ---- the step -------------------------------------------------------------------------
    def _step(self, draw: Callable[[int, int, str], int] | None = None) -> None:
        """One engine step; with `draw(lo, hi, label)`, a speculative one (drafts and how many
        are accepted drawn with it)."""
        sched, bm = self.sched, self.bm
        assert sched is not None
        cfg = sched.config
        for r in sched.running + sched.waiting:
            r.draft_ids = []
            if draw is not None:  # K at most what the length limit leaves (Speculator._plan)
                k = draw(0, min(5, r.max_total_tokens - len(r.all_ids)), "k")
                r.draft_ids = [draw(0, VOCAB - 1, "draft") for _ in range(k)]
        proposed = {r.id: list(r.draft_ids) for r in sched.running}
        ids_before = {r.id: list(r.all_ids) for r in sched.running + sched.waiting}
        running = list(sched.running)
        waiting = list(sched.waiting)
        computed = {r.id: r.num_computed for r in running}
        decoding = {r.id for r in running if len(r.all_ids) - r.num_computed == 1}

        self.victims.clear()
        out = sched.schedule()

        ids = [c.req.id for c in out.chunks]
        preempted = {r.id for r in out.preempted}
        finished = {r.id for r in out.finished}
        assert len(set(ids)) == len(ids), "a request scheduled twice in one step"
        assert out.num_tokens <= cfg.max_batch_tokens
        assert len(out.chunks) <= cfg.max_num_seqs
        if cfg.max_padded_rows is not None and out.chunks:
            longest = max(c.num_tokens for c in out.chunks)
            assert len(out.chunks) * longest <= cfg.max_padded_rows
            if len(out.chunks) * longest > cfg.max_padded_rows // 2:
                event("padded rows near the bound")
        assert not (set(ids) & preempted) and not (set(ids) & finished)
        if out.preempted:
            event("preemption")
        # The victim is the least important (lowest priority, then latest arrival) of the
        # running requests not yet scheduled in this step, the one asking for room included:
        # a low-priority request must not evict a more important one.
        for victim, candidates in self.victims:
            assert victim in candidates
            worst = max(candidates, key=lambda r: (r.priority, r.seqno))
            assert victim is worst, f"{victim.id} preempted while {worst.id} was less important"
        for c in out.chunks:
            self._check_chunk(c, computed, decoding, proposed)
        # Decodes first: their chunks lead the batch, and a running decode is left out only
        # when it lost its blocks or the decodes before it used up the whole token budget with
        # their real tokens: another request's drafts never cost a decode its token.
        kinds = [c.req.id in decoding for c in out.chunks]
        assert kinds == sorted(kinds, reverse=True), "a prefill chunk ran ahead of a decode"
        decode_tokens = sum(1 for c in out.chunks if c.req.id in decoding)
        for rid in decoding - set(ids) - preempted - finished:
            assert decode_tokens == cfg.max_batch_tokens, f"decode {rid} skipped with budget left"
        if any(c.draft for c in out.chunks):
            event("speculative chunk")
        if any(proposed[c.req.id] and not c.draft for c in out.chunks if c.req.id in decoding):
            event("drafts dropped: a plain decode")
        # Admissions go by (priority, arrival), and later arrivals never jump the queue.
        admitted = [c.req for c in out.chunks if c.req.id not in computed]
        keys = [(r.priority, r.seqno) for r in admitted]
        assert keys == sorted(keys)
        if admitted:
            event("admission")
            assert all((r.priority, r.seqno) > keys[-1] for r in sched.waiting
                       if r.id not in preempted)
            assert not out.preempted, "admitted while preempting"
        for r in out.preempted:
            assert r.id in computed  # only running requests are preempted
            assert r.status is Status.WAITING and r.num_computed == 0 and not bm.has(r.id)
        for r in out.finished:
            assert r.finished and r.finish_reason in ("length", "error")
            assert r in running or r in waiting

        # Run the batch: block copies first, then every chunk writes its slots.
        for src, dst in out.copies:
            self.shadow[dst] = list(self.shadow[src])
        for c in out.chunks:
            table = bm.block_table(c.req.id)
            tokens = c.req.all_ids[:c.start] + c.token_ids  # a speculative chunk's drafts too
            for p in range(c.start, c.start + c.num_tokens):
                self.shadow[table[p // self.bs]][p % self.bs] = tuple(tokens[:p + 1])
        sched.update(out)
        for c in out.chunks:  # drafts are not computed until verification keeps them
            assert c.req.num_computed == c.start + c.num_tokens - len(c.draft)
        held = {c.req.id: len(bm.block_table(c.req.id)) for c in out.chunks if c.draft}
        _sample(sched, out, self.rng,
                None if draw is None else lambda k: draw(0, k, "accepted"))
        for rid, n in held.items():
            if bm.has(rid) and len(bm.block_table(rid)) < n:
                event("rejected drafts' blocks given back")
        # Tokens are only ever appended, one per step at most (or the kept drafts and one
        # more): a preempted request keeps what it generated, and its recomputation samples
        # nothing until it catches up.
        drafts = {c.req.id: c.draft for c in out.chunks}
        for r in self.reqs:
            if r.id in ids_before:
                before = ids_before[r.id]
                assert r.all_ids[:len(before)] == before
                assert len(r.all_ids) - len(before) <= (1 + len(drafts[r.id]) if r.id in ids
                                                        else 0)
                if r.id in ids and drafts[r.id]:  # kept drafts, then the target's token
                    new = r.all_ids[len(before):]
                    assert new[:-1] == drafts[r.id][:len(new) - 1]
        self._check()

    def _check_chunk(self, c: Chunk, computed: dict[str, int], decoding: set[str],
                     proposed: dict[str, list[int]]) -> None:
        req, bm = c.req, self.bm
        assert req.status is Status.RUNNING and req in self.sched.running
        assert c.num_tokens >= 1
        assert c.start == req.num_computed
        real = c.num_tokens - len(c.draft)  # the chunk's tokens that are not drafts
        assert c.start + real <= len(req.all_ids)
        assert c.sample == (c.start + real == len(req.all_ids))
        if c.draft:
            # Drafts only for a request that was decoding: its last token, then a prefix of
            # what was proposed for it, every row's logits wanted.
            assert req.id in decoding, "drafts scheduled for a prefilling or new request"
            assert real == 1 and c.sample and c.all_rows
            assert c.draft == proposed[req.id][:len(c.draft)]
            assert c.token_ids == [req.all_ids[-1], *c.draft]
        else:
            assert c.token_ids == req.all_ids[c.start:c.start + c.num_tokens]
        # The slots this step writes are all in the request's table.
        assert len(bm.block_table(req.id)) * self.bs >= c.start + c.num_tokens
        if req.id in computed:  # a running request continues where it stopped
            assert c.start == computed[req.id]
        else:  # an admission starts after its prefix-cache hits: whole blocks only
            assert c.start % self.bs == 0 and c.start < len(req.all_ids)
            if c.start:
                event("prefix-cache hit")
            if req.params.prompt_logprobs is not None:
                assert c.start == 0, "prompt logprobs need every prompt row computed"
        if c.prompt_logits:
            assert req.params.prompt_logprobs is not None and c.start < req.num_prompt

    # ---- invariants -----------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        if self.sched is not None:
            self._check()
        self.broken = False

    def _check(self) -> None:
        sched, bm = self.sched, self.bm
        assert sched is not None
        bm.check()
        run = [r.id for r in sched.running]
        wait = [r.id for r in sched.waiting]
        assert len(set(run + wait)) == len(run) + len(wait), "a request queued twice"
        assert set(sched.requests) == set(run) | set(wait)
        assert len(run) <= sched.config.max_num_seqs
        held: Counter[int] = Counter()
        for r in sched.running:
            assert r.status is Status.RUNNING and bm.has(r.id)
            table = bm.block_table(r.id)
            held.update(table)
            # The table holds exactly the computed slots, and something is left to compute.
            assert len(table) == bm.blocks_for(r.num_computed)
            assert r.num_computed < len(r.all_ids) < r.max_total_tokens
            for p in range(r.num_computed):  # no wrong KV: every slot holds this prefix
                got = self.shadow[table[p // self.bs]][p % self.bs]
                assert got == tuple(r.all_ids[:p + 1]), f"{r.id} position {p}: foreign KV"
        for r in sched.waiting:
            assert r.status is Status.WAITING and not bm.has(r.id) and r.num_computed == 0
        # Only running requests hold blocks; everything else is on the free list.
        assert bm.num_free_blocks + len(held) == bm.num_blocks
        for r in self.reqs:
            if r.finished:
                assert r.finish_reason in FINISH_REASONS and not bm.has(r.id)
                assert r.id not in sched.requests
                # "error" is for prompts that never fit the cache; a request that ran and
                # outgrew it stops with "length", whether or not it was preempted first.
                assert r.finish_reason != "error" or r.num_output == 0, r.error
            assert len(r.all_ids) <= r.max_total_tokens
            assert r.all_ids[:r.num_prompt] == r.prompt_ids  # the prompt is never rewritten
            if r.prompt_logprobs is not None:
                # One row per prompt position, even across preemption and recomputation.
                assert len(r.prompt_logprobs) <= r.num_prompt
                if r.num_output:
                    assert len(r.prompt_logprobs) == r.num_prompt

    def teardown(self) -> None:
        """No new work: everything queued must finish within a bounded number of steps."""
        sched = self.sched
        if sched is None or self.broken:
            return
        live = sched.waiting + sched.running
        # Any finite bound catches a livelock. The work left is every live request's tokens
        # plus recomputation after preemptions; observed drains take under one step per token
        # (1000 examples), so 8 per token leaves room for unlucky preemption chains.
        bound = 8 * sum(r.max_total_tokens for r in live) + 16
        steps = 0
        while sched.has_unfinished():
            assert steps < bound, f"no progress after {steps} steps: livelock"
            # Every other step speculates, with drafts and acceptance from the example's rng.
            self._step(None if steps % 2 else lambda lo, hi, _: self.rng.randint(lo, hi))
            steps += 1
        for r in self.reqs:
            assert r.finished and r.finish_reason in FINISH_REASONS
        assert self.bm.num_free_blocks == self.bm.num_blocks, "blocks leaked"


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- focused unit tests


def _make(num_blocks: int = 64, block_size: int = 4, max_batch_tokens: int = 64,
          max_num_seqs: int = 8) -> tuple[Scheduler, BlockManager]:
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_batch_tokens=max_batch_tokens,
                                     max_num_seqs=max_num_seqs), bm), bm


def test_decodes_are_not_starved_by_a_long_prefill() -> None:
    sched, _ = _make(max_batch_tokens=16)
    d = _request("d", [1, 2, 3], max_tokens=20)
    sched.add(d)
    _step(sched)  # prefill and first token
    p = _request("p", [i % 7 for i in range(100)], max_tokens=2)
    sched.add(p)
    steps = 0
    while p.num_computed < 100:
        out = _step(sched)
        steps += 1
        # The running decode gets its token every step, ahead of the prompt's chunk...
        assert out.chunks[0].req is d and out.chunks[0].num_tokens == 1 and out.chunks[0].sample
        # ...and the prompt is chunk-prefilled with the rest of the budget.
        (chunk,) = [c for c in out.chunks if c.req is p]
        assert chunk.num_tokens == min(15, 100 - chunk.start)
        assert out.num_tokens <= 16
    assert steps == 7 and d.num_output == 1 + steps


def test_a_long_prompt_beside_decodes_is_chunked_to_the_padded_rows_bound() -> None:
    # The fast path pads every sequence's query rows to the step's longest chunk: 3 decodes
    # and a 100-token prompt would be 4 x 100 rows; with a bound of 40 the prompt takes 10.
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_batch_tokens=64, max_num_seqs=8,
                                      max_padded_rows=40), bm)
    decodes = [_request(f"d{i}", [1, 2, 3], max_tokens=30) for i in range(3)]
    for d in decodes:
        sched.add(d)
    _step(sched)  # their prompts: 3 sequences x 3 tokens
    p = _request("p", [i % 7 for i in range(100)], max_tokens=2)
    sched.add(p)
    out = _step(sched)
    assert [c.num_tokens for c in out.chunks] == [1, 1, 1, 10]
    assert len(out.chunks) * max(c.num_tokens for c in out.chunks) <= 40
    with pytest.raises(ValueError, match="max_padded_rows must be >= max_num_seqs"):
        Scheduler(SchedulerConfig(max_num_seqs=8, max_padded_rows=4), bm)


def test_admission_goes_by_priority_then_arrival() -> None:
    sched, _ = _make(max_num_seqs=1)
    for rid, prio in (("a", 2), ("b", 0), ("c", 1), ("d", 0)):
        sched.add(_request(rid, [len(rid)], max_tokens=1, priority=prio))
    order = []
    while sched.has_unfinished():
        order += [c.req.id for c in _step(sched).chunks]
    assert order == ["b", "d", "c", "a"]


def _three_running(priorities: tuple[int, int, int]) -> tuple[Scheduler, list[Request]]:
    """x, y, z with 4-token prompts, prefilled together into a full cache (2 blocks each)."""
    sched, bm = _make(num_blocks=6, block_size=2)
    reqs = [_request(rid, [i, i, i, i], max_tokens=3, priority=prio)
            for i, (rid, prio) in enumerate(zip("xyz", priorities))]
    for r in reqs:
        sched.add(r)
    out = _step(sched)
    assert len(out.chunks) == 3 and bm.num_free_blocks == 0
    return sched, reqs


def test_preemption_victim_is_lowest_priority() -> None:
    sched, (_, y, _) = _three_running((0, 1, 0))
    out = _step(sched)  # every decode needs a third block: someone has to go
    assert out.preempted == [y]  # the least important, though z arrived later
    assert {c.req.id for c in out.chunks} == {"x", "z"}


def test_preemption_victim_is_most_recent_among_equals() -> None:
    sched, (_, _, z) = _three_running((0, 0, 0))
    assert _step(sched).preempted == [z]


def test_low_priority_request_does_not_evict_a_more_important_one() -> None:
    # x (least important) is admitted first, so it comes first in the decode loop; when it
    # needs a block it must give up its own, not take y's or z's.
    sched, bm = _make(num_blocks=7, block_size=2)
    x = _request("x", [1, 1, 1, 1], max_tokens=10, priority=5)
    sched.add(x)
    _step(sched)
    y = _request("y", [2, 2, 2], max_tokens=10)
    z = _request("z", [3, 3, 3], max_tokens=10)
    sched.add(y)
    sched.add(z)
    _step(sched)  # x decodes into its third block; y and z take the last four
    assert bm.num_free_blocks == 0
    _step(sched)  # everyone still fits in their blocks
    out = _step(sched)  # x needs a fourth block
    assert out.preempted == [x]
    assert [c.req.id for c in out.chunks] == ["y", "z"]


def test_preempted_request_keeps_its_tokens_and_recomputes_them() -> None:
    sched, (_, _, z) = _three_running((0, 0, 0))
    kept = list(z.all_ids)
    assert z.num_output == 1
    assert _step(sched).preempted == [z]
    assert z.status is Status.WAITING and z.num_computed == 0 and z.num_preemptions == 1
    assert z.all_ids == kept and not sched.blocks.has(z.id)
    assert sched.num_preemptions == 1
    chunks = []
    while not z.finished:
        chunks += [c for c in _step(sched, token=9).chunks if c.req is z]
    # On re-admission z recomputes prompt and output (after any surviving cached blocks),
    # sampling only once the recomputation reaches its last token; nothing is re-sampled.
    first = chunks[0]
    assert first.start % 2 == 0 and first.start < len(kept)
    end = first.start
    for c in chunks:
        assert c.start == end
        end += c.num_tokens
        if end < len(kept):
            assert not c.sample
        if c.sample:
            break
    assert end == len(kept)
    assert z.all_ids[:len(kept)] == kept and z.num_output == 3
    assert z.finish_reason == "length"


def test_prompt_logprobs_survive_preemption_mid_prompt() -> None:
    # r0's prompt is chunk-prefilled (3 tokens a step) with prompt logprob rows recorded per
    # chunk; it is preempted part-way, and its recomputation must not record the rows again.
    sched, _ = _make(num_blocks=4, block_size=2, max_batch_tokens=3, max_num_seqs=2)
    r0 = _request("r0", [1, 2, 3, 4, 5, 6], max_tokens=1, priority=1, prompt_logprobs=1)
    r1 = _request("r1", [7], max_tokens=3)
    sched.add(r0)
    sched.add(r1)
    _drain(sched)
    assert r0.num_preemptions >= 1
    assert r0.finish_reason == r1.finish_reason == "length"
    assert len(r0.prompt_logprobs) == r0.num_prompt  # one row per prompt position


def test_preempted_request_at_the_cache_size_resumes() -> None:
    # r0 fills the 10-slot cache (9 prompt tokens + 1 output) and is preempted for r1; it has
    # to come back and finish normally, as it would have without the preemption, not fail
    # with an "error" telling the user the prompt is too long.
    sched, _ = _make(num_blocks=10, block_size=1, max_batch_tokens=10, max_num_seqs=2)
    r0 = _request("r0", [5] * 9, max_tokens=2, priority=1)
    r1 = _request("r1", [7], max_tokens=2)
    sched.add(r0)
    sched.add(r1)
    _drain(sched)
    assert r0.num_preemptions == 1
    assert (r0.finish_reason, r0.error, r0.num_output) == ("length", None, 2)


def test_prompt_too_large_for_the_whole_cache_is_an_error() -> None:
    sched, bm = _make(num_blocks=2, block_size=2)
    r = _request("r", [1, 2, 3, 4], max_tokens=4)
    sched.add(r)
    out = _step(sched)
    assert out.finished == [r] and r.finish_reason == "error" and "KV cache" in r.error
    assert not sched.has_unfinished() and bm.num_free_blocks == 2


def test_request_outgrowing_the_cache_alone_stops_with_length() -> None:
    sched, bm = _make(num_blocks=2, block_size=2)
    r = _request("r", [1, 2], max_tokens=20)
    sched.add(r)
    for _ in range(10):
        if not sched.has_unfinished():
            break
        _step(sched)
    assert r.finish_reason == "length" and len(r.all_ids) == 5  # 4 slots + the last sample
    assert bm.num_free_blocks == 2


def test_abort_waiting_running_and_finished() -> None:
    sched, bm = _make(max_num_seqs=1)
    a, b = _request("a", [1, 2], max_tokens=5), _request("b", [3], max_tokens=5)
    sched.add(a)
    sched.add(b)
    _step(sched)
    assert a.status is Status.RUNNING and b.status is Status.WAITING
    assert sched.abort("b") is b and b.finish_reason == "abort"
    assert sched.abort("a") is a and not bm.has("a")
    assert sched.abort("a") is None and a.finish_reason == "abort"
    assert not sched.has_unfinished() and bm.num_free_blocks == bm.num_blocks


def test_duplicate_request_id_is_rejected() -> None:
    sched, _ = _make()
    sched.add(_request("a", [1]))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(_request("a", [2]))


def test_invalid_budgets() -> None:
    with pytest.raises(ValueError):
        Scheduler(SchedulerConfig(max_batch_tokens=0), BlockManager(4, 4))
    with pytest.raises(ValueError):
        Scheduler(SchedulerConfig(max_num_seqs=0), BlockManager(4, 4))


def _drain(sched, max_steps: int = 50) -> None:
    """Step until every request has finished (at most max_steps)."""
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        _step(sched)


# ---------------------------------------------------------------- speculative decoding


def _decoding_with_drafts(sched: Scheduler, n: int) -> SchedulerOutput:
    """n decoding requests, the first with five drafts: the step scheduled for them."""
    reqs = [_request(f"d{i}", [i + 1], max_tokens=10) for i in range(n)]
    for r in reqs:
        sched.add(r)
    _step(sched)
    reqs[0].draft_ids = [7, 7, 7, 7, 7]
    return sched.schedule()


def test_drafts_never_cost_another_decode_its_token() -> None:
    # Three decodes, a budget of 4: the first one's 5 drafts may only take the one token the
    # others' real tokens leave.
    out = _decoding_with_drafts(_make(max_batch_tokens=4)[0], 3)
    assert [(c.req.id, c.num_tokens, c.draft) for c in out.chunks] == [
        ("d0", 2, [7]), ("d1", 1, []), ("d2", 1, [])]
    # The same under max_padded_rows: 4 decodes in 8 rows leave 2 rows for each.
    sched = Scheduler(SchedulerConfig(max_batch_tokens=64, max_num_seqs=4, max_padded_rows=8),
                      BlockManager(64, 4))
    out = _decoding_with_drafts(sched, 4)
    assert [c.num_tokens for c in out.chunks] == [2, 1, 1, 1]
    assert len(out.chunks) * max(c.num_tokens for c in out.chunks) <= 8


def test_drafts_are_only_for_decoding_requests() -> None:
    sched, _ = _make(max_batch_tokens=4)
    p = _request("p", [1] * 10, max_tokens=4)
    p.draft_ids = [5, 5]  # stale drafts on a request still prefilling, or just admitted
    sched.add(p)
    out = _step(sched)
    assert [(c.num_tokens, c.draft) for c in out.chunks] == [(4, [])]
    out = sched.schedule()
    assert [(c.num_tokens, c.draft) for c in out.chunks] == [(4, [])]


def test_drafts_that_do_not_fit_give_a_plain_decode_without_preempting() -> None:
    # Two requests fill a 4-block cache (2 slots a block); a's drafts need a fresh block.
    sched, bm = _make(num_blocks=4, block_size=2)
    a, b = _request("a", [1, 2, 3], max_tokens=8), _request("b", [4, 5, 6], max_tokens=8)
    sched.add(a)
    sched.add(b)
    _step(sched)  # 3 slots each, both have a 4th token to compute in their second block
    assert bm.num_free_blocks == 0
    a.draft_ids = [9, 9]
    out = sched.schedule()
    assert out.preempted == [] and b.status is Status.RUNNING
    assert [(c.req.id, c.num_tokens, c.draft) for c in out.chunks] == [("a", 1, []), ("b", 1, [])]
    # Nor may drafts take the block another decode's real token needs: a's next token fits
    # in its block but its drafts need the one free block, which b's next token needs.
    sched, bm = _make(num_blocks=4, block_size=2)
    a, b = _request("a", [1, 2, 3], max_tokens=8), _request("b", [4, 5], max_tokens=8)
    sched.add(a)
    sched.add(b)
    _step(sched)
    assert bm.num_free_blocks == 1
    a.draft_ids = [9, 9]
    out = sched.schedule()
    assert out.preempted == [] and b.status is Status.RUNNING
    assert [(c.req.id, c.num_tokens, c.draft) for c in out.chunks] == [("a", 1, []), ("b", 1, [])]
    assert len(bm.block_table("b")) == 2
    bm.check()


def test_accept_keeps_drafts_and_gives_back_the_rejected_slots() -> None:
    sched, bm = _make(num_blocks=8, block_size=2)
    r = _request("r", [1, 2], max_tokens=10)
    sched.add(r)
    _step(sched, token=3)  # [1, 2, 3]: 2 computed, the 3rd to decode
    r.draft_ids = [4, 5, 6, 7]
    out = sched.schedule()
    (c,) = out.chunks
    assert (c.start, c.num_tokens, c.token_ids) == (2, 5, [3, 4, 5, 6, 7])
    assert len(bm.block_table("r")) == 4 and bm.num_free_blocks == 4  # 7 slots
    sched.update(out)
    assert r.num_computed == 3  # the real token only, until verification
    r.all_ids += [4, 5, 0]  # two drafts kept, then the target's correction of the third
    sched.accept(r, 2)
    assert r.num_computed == 5 and len(bm.block_table("r")) == 3 and bm.num_free_blocks == 5
    bm.check()
    # Rolled back to a block boundary: the next step's prefix is what was kept.
    r.draft_ids = [1]
    out = sched.schedule()
    assert out.chunks[0].token_ids == [0, 1]
    sched.update(out)
    r.all_ids += [2]  # the draft rejected
    sched.accept(r, 0)
    assert r.num_computed == 6 and len(bm.block_table("r")) == 3
    bm.check()
    # Prefix-cache keys exist only for kept tokens: a prompt with the rejected draft misses.
    sched.add(_request("q", [1, 2, 3, 4, 5, 0, 1, 9], max_tokens=1))
    out = sched.schedule()
    assert [c.start for c in out.chunks if c.req.id == "q"] == [6]
    sched.finish(r, "abort")
    sched.finish(sched.requests["q"], "abort")
    assert bm.num_free_blocks == 8
