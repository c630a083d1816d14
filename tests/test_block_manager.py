"""runtime.block_manager: accounting, prefix caching and copy-on-write under random use.

The stateful test drives a BlockManager through random interleavings of every operation and
keeps a shadow model next to it: which token each sequence has in each position, how many of
them are computed (KV written), and, per physical block, what every slot last had written into
it. A slot's KV depends on its token *and every token before it*, so the shadow stores the
whole prefix up to the slot. After each operation the shadow must agree with the manager: a
sequence's computed positions must read back its own prefixes through its block table. A wrong
prefix-cache hit or a missing copy-on-write would make some sequence read another's KV, which
is exactly the bug class (silently wrong outputs) this file exists to catch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from llm_engine.runtime.block_manager import BlockManager, BlockManagerError

# Three symbols and short prompts: prompts share prefixes often, so the prefix cache hits.
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=12)


@dataclass
class _ShadowSeq:
    tokens: list[int]  # every token the sequence has, computed or not
    computed: int  # leading positions whose KV is written and committed
    claimed: int  # slots asked of the manager (allocate_prompt / allocate_slots)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm: BlockManager
        self.seqs: dict[str, _ShadowSeq] = {}
        # Per block, what each slot's KV was last computed from (the prefix ending at that slot):
        # blocks taken from the free list keep their old contents, as real KV memory does, so a
        # wrong hit reads a stale or foreign prefix.
        self.shadow: dict[int, list[tuple[int, ...] | None]] = {}
        # Blocks that were free when the prefix cache was reset and have not been held since:
        # none of them may come back as a hit.
        self.stale: set[int] = set()
        self.next_id = 0
        self.history: list[list[int]] = []  # token lists of every sequence so far
        # Per prefix-cache key: its block and that block's contents when first seen cached.
        self.cached: dict[bytes, tuple[int, list[tuple[int, ...] | None]]] = {}

    # ---- helpers --------------------------------------------------------------------------
    @property
    def bs(self) -> int:
        return self.bm.block_size

    def _snapshot(self) -> tuple[Any, ...]:
        """Everything a failed operation must leave alone, including the LRU order and the
        statistics (a failed allocation must not count as a prefix-cache query)."""
        bm = self.bm
        return ({sid: list(bm.block_table(sid)) for sid in self.seqs},
                bm.num_free_blocks,
                [bm.ref_count(b) for b in range(bm.num_blocks)],
                list(bm._free), dict(bm._cached), list(bm._copies),
                (bm.stats.queries, bm.stats.hits, bm.stats.evictions))

    def _held(self) -> Counter[int]:
        return Counter(b for sid in self.seqs for b in self.bm.block_table(sid))

    def _write(self, sid: str, start: int, end: int) -> None:
        """The executor writing KV for positions [start, end) of `sid` through its table."""
        s, table = self.seqs[sid], self.bm.block_table(sid)
        for p in range(start, end):
            self.shadow[table[p // self.bs]][p % self.bs] = tuple(s.tokens[:p + 1])

    def _new_id(self) -> str:
        self.next_id += 1
        return f"s{self.next_id}"

    # ---- rules ----------------------------------------------------------------------------
    @initialize(num_blocks=st.integers(1, 24), block_size=st.integers(1, 4),
                prefix_caching=st.sampled_from([True, True, False]))
    def setup(self, num_blocks: int, block_size: int, prefix_caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, prefix_caching=prefix_caching)
        self.shadow = {b: [None] * block_size for b in range(num_blocks)}

    # At most a few live sequences, so examples keep freeing and reusing blocks instead of
    # filling the cache once and then only being refused.
    @precondition(lambda self: len(self.seqs) < 5)
    @rule(tokens=TOKENS, chunk=st.integers(1, 14), use_cache=st.sampled_from([True, True, False]))
    def allocate_prompt(self, tokens: list[int], chunk: int, use_cache: bool) -> None:
        self._allocate(tokens, chunk, use_cache)

    @precondition(lambda self: self.history and len(self.seqs) < 5)
    @rule(data=st.data(), tail=st.lists(st.integers(0, 2), max_size=6), chunk=st.integers(1, 14))
    def allocate_shared_prefix(self, data: st.DataObject, tail: list[int], chunk: int) -> None:
        """A prompt starting with (part of) an earlier sequence's tokens: the cache hit path
        that independent random prompts would reach too rarely."""
        # Recent and live sequences' computed tokens: those are the ones likely still cached.
        bases = self.history[-6:] + [s.tokens[:s.computed] for s in self.seqs.values()]
        base = data.draw(st.sampled_from(bases), label="base")
        cut = data.draw(st.one_of(st.just(len(base)), st.integers(0, len(base))), label="cut")
        if cut + len(tail) == 0:
            tail = [0]
        self._allocate(base[:cut] + tail, chunk, use_cache=True)

    def _allocate(self, tokens: list[int], chunk: int, use_cache: bool) -> None:
        bm, sid = self.bm, self._new_id()
        before = self._snapshot()
        free_before = bm.num_free_blocks
        stats_before = (bm.stats.queries, bm.stats.hits)
        cached = bm.allocate_prompt(sid, tokens, chunk, use_cache=use_cache)
        if cached is None:
            # (Events report coverage under pytest --hypothesis-show-statistics.)
            event("allocate_prompt refused")
            assert self._snapshot() == before  # a failed allocation changes nothing
            # The manager never needs more than the whole prompt's blocks, so it may only
            # refuse when even those are not free.
            assert free_before < bm.blocks_for(len(tokens))
            return
        caching = bm.prefix_caching and use_cache
        assert 0 <= cached < len(tokens), "one token must stay to compute: its logits"
        assert cached % self.bs == 0
        if not caching:
            assert cached == 0
        if cached:
            event("prefix-cache hit")
        table = bm.block_table(sid)
        claimed = cached + min(chunk, len(tokens) - cached)
        assert len(table) == bm.blocks_for(claimed)
        for i in range(cached // self.bs):
            # No poisoning: a hit block holds exactly the prompt's tokens at those positions.
            assert table[i] not in self.stale, f"block {table[i]} hit after reset_prefix_cache"
            assert self.shadow[table[i]] == [tuple(tokens[:p + 1])
                                             for p in range(i * self.bs, (i + 1) * self.bs)]
        # The rest are fresh blocks, owned by this sequence alone.
        assert all(bm.ref_count(b) == 1 for b in table[cached // self.bs:])
        if caching:
            assert (bm.stats.queries, bm.stats.hits) == (stats_before[0] + len(tokens),
                                                         stats_before[1] + cached)
        else:
            assert (bm.stats.queries, bm.stats.hits) == stats_before
        self.stale -= set(table)
        self.seqs[sid] = _ShadowSeq(list(tokens), cached, claimed)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), extra=st.integers(1, 6))
    def allocate_slots(self, data: st.DataObject, extra: int) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)), label="seq")
        self._grow(data, sid, extra)

    def _grow(self, data: st.DataObject, sid: str, extra: int) -> bool:
        """Claim `extra` more slots for `sid` (more prompt, or tokens past the prompt); False
        when the manager refused."""
        bm = self.bm
        s = self.seqs[sid]
        target = s.claimed + extra
        new_tokens = data.draw(st.lists(st.integers(0, 2), min_size=max(0, target - len(s.tokens)),
                                        max_size=max(0, target - len(s.tokens))), label="new")
        old = list(bm.block_table(sid))
        # Appending into a partially filled last block that someone else also holds.
        cow = s.claimed % self.bs != 0 and bm.ref_count(old[-1]) > 1
        need = max(bm.blocks_for(target) - len(old), 0) + cow
        before = self._snapshot()
        if not bm.allocate_slots(sid, target):
            event("allocate_slots refused")
            assert self._snapshot() == before  # a failed allocation changes nothing
            assert need > before[1], "refused although the free blocks sufficed"
            return False
        copies = bm.take_copies()
        table = bm.block_table(sid)
        assert len(table) == bm.blocks_for(target)
        if cow:
            event("copy-on-write")
            # The writer gets a private copy of the shared block; only its last entry changes.
            assert copies == [(old[-1], table[len(old) - 1])]
            assert table[:len(old) - 1] == old[:-1]
            assert table[len(old) - 1] != old[-1]
        else:
            assert copies == []
            assert table[:len(old)] == old
        for other in self.seqs:  # the other sharers' tables never change
            if other != sid:
                assert bm.block_table(other) == before[0][other]
        for src, dst in copies:  # the executor copies before the step writes
            self.shadow[dst] = list(self.shadow[src])
        s.tokens += new_tokens
        s.claimed = target
        self.stale -= set(table)
        return True

    @precondition(lambda self: any(s.claimed > s.computed for s in self.seqs.values()))
    @rule()
    def compute_all(self) -> None:
        """One engine step: every claimed slot of every sequence is written and committed."""
        for sid, s in self.seqs.items():
            if s.claimed > s.computed:
                self._write(sid, s.computed, s.claimed)
                self.bm.commit(sid, s.tokens, s.claimed)
                s.computed = s.claimed
                self.history.append(list(s.tokens[:s.computed]))

    @precondition(lambda self: any(s.claimed > s.computed for s in self.seqs.values()))
    @rule(data=st.data())
    def write_and_commit(self, data: st.DataObject) -> None:
        """A step computed some of the claimed slots: write their KV, then commit."""
        sid = data.draw(st.sampled_from(sorted(k for k, s in self.seqs.items()
                                               if s.claimed > s.computed)), label="seq")
        s = self.seqs[sid]
        end = data.draw(st.integers(s.computed + 1, s.claimed), label="end")
        self._write(sid, s.computed, end)
        self.bm.commit(sid, s.tokens, end)
        s.computed = end
        self.history.append(s.tokens[:end])

    # A speculative step (runtime.scheduler, runtime.speculative): a sequence whose every token
    # has a slot claims K more for proposed drafts; the step writes every pending slot, the real
    # tokens are committed (Scheduler.update), and verification keeps some of the drafts: the
    # slots past them are given back (truncate) and what is kept is committed (Scheduler.accept).
    @precondition(lambda self: any(len(s.tokens) == s.claimed for s in self.seqs.values()))
    @rule(data=st.data(), k=st.integers(1, 6))
    def speculate(self, data: st.DataObject, k: int) -> None:
        bm = self.bm
        sid = data.draw(st.sampled_from(sorted(i for i, s in self.seqs.items()
                                               if len(s.tokens) == s.claimed)), label="seq")
        s = self.seqs[sid]
        real = s.claimed  # the tokens the step computes for real; the drafts come after
        if not self._grow(data, sid, k):
            return
        self._write(sid, s.computed, s.claimed)
        bm.commit(sid, s.tokens, real)
        s.computed = real
        self.keys_are_committed_prefixes()
        # Prefix-cache keys cover committed full blocks only, and those may not be rolled back.
        committed = len(bm._seqs[sid].keys) * self.bs
        assert committed <= real
        before = self._snapshot()
        if committed:
            with pytest.raises(BlockManagerError, match="committed"):
                bm.truncate(sid, data.draw(st.integers(0, committed - 1), label="too_far"))
            assert self._snapshot() == before
        with pytest.raises(BlockManagerError):
            bm.truncate(sid, s.claimed + 1)  # past the claimed end
        assert self._snapshot() == before
        # Usually verification keeps the real tokens and a prefix of the drafts; any point down
        # to the committed blocks is a valid rollback too.
        keep = data.draw(st.one_of(st.integers(real, s.claimed), st.integers(committed, real)),
                         label="keep")
        old = list(bm.block_table(sid))
        refs = [bm.ref_count(b) for b in range(bm.num_blocks)]
        bm.truncate(sid, keep)
        table = bm.block_table(sid)
        released = Counter(old[bm.blocks_for(keep):])
        assert table == old[:bm.blocks_for(keep)]  # the head is untouched
        if released:
            event("speculative rollback released blocks")
        for b in range(bm.num_blocks):  # only this sequence's own references go
            assert bm.ref_count(b) == refs[b] - released[b]
        assert bm.num_free_blocks == before[1] + sum(1 for b in released if refs[b] == released[b])
        assert bm.take_copies() == []
        for other in self.seqs:
            if other != sid:
                assert bm.block_table(other) == before[0][other]
        del s.tokens[keep:]
        s.claimed = s.computed = keep
        bm.commit(sid, s.tokens, keep)
        self.history.append(list(s.tokens))

    @precondition(lambda self: self.seqs)
    @rule()
    def free_all(self) -> None:
        """Every sequence ends: no block may stay held, whatever was rolled back or shared."""
        for sid in list(self.seqs):
            self.bm.free(sid)
            del self.seqs[sid]
        self.bm.check()
        assert self.bm.num_free_blocks == self.bm.num_blocks, "blocks leaked"
        assert all(self.bm.ref_count(b) == 0 for b in range(self.bm.num_blocks))

    # Forking happens between steps (parallel sampling after the prompt), when every claimed
    # slot is written: a fork with claimed-but-unwritten slots would have both sharers write
    # the same slots, and no copy-on-write check can see that coming.
    @precondition(lambda self: any(s.claimed == s.computed for s in self.seqs.values()))
    @rule(data=st.data(), append=st.sampled_from(["child", "parent", None]),
          extra=st.integers(1, 6))
    def fork(self, data: st.DataObject, append: str | None, extra: int) -> None:
        bm = self.bm
        parent = data.draw(st.sampled_from(sorted(k for k, s in self.seqs.items()
                                                  if s.claimed == s.computed)), label="parent")
        refs = [bm.ref_count(b) for b in range(bm.num_blocks)]
        free = bm.num_free_blocks
        child = self._new_id()
        bm.fork(parent, child)
        assert bm.block_table(child) == bm.block_table(parent)
        assert bm.block_table(child) is not bm.block_table(parent)  # own list, shared blocks
        assert bm.num_free_blocks == free  # sharing takes no block
        for b in set(bm.block_table(parent)):
            assert bm.ref_count(b) == refs[b] + bm.block_table(parent).count(b)
        p = self.seqs[parent]
        self.seqs[child] = _ShadowSeq(list(p.tokens), p.computed, p.claimed)
        # Appending right away is what parallel sampling does, and it is the copy-on-write
        # case whenever the shared last block is partial.
        if append is not None:
            self._grow(data, child if append == "child" else parent, extra)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)), label="seq")
        before = self._snapshot()
        with pytest.raises(BlockManagerError):  # a live id cannot be allocated again...
            self.bm.allocate_prompt(sid, [0], 1)
        with pytest.raises(BlockManagerError):  # ...nor be a fork's child
            self.bm.fork(sid, sid)
        assert self._snapshot() == before
        self.bm.free(sid)
        del self.seqs[sid]
        assert not self.bm.has(sid)
        before = self._snapshot()
        self.bm.free(sid)  # a second free of the same sequence is a no-op, not a double free
        assert self._snapshot() == before

    # Preconditions on the argument-less rules matter for coverage: hypothesis enables a random
    # subset of rules per example, and without them an example whose allocation rules are
    # switched off would spend all its steps on no-op resets. A reset is only interesting when
    # some free block still has a cache entry to forget.
    @precondition(lambda self: any(self.bm._blocks[b].key is not None for b in self.bm._free))
    @rule()
    def reset_prefix_cache(self) -> None:
        before = self._snapshot()
        self.bm.reset_prefix_cache()
        after = self._snapshot()
        assert after[:4] == before[:4]  # tables, free count, refs, LRU order untouched
        held = self._held()
        self.stale = {b for b in range(self.bm.num_blocks) if b not in held}

    # ---- invariants -----------------------------------------------------------------------
    @invariant()
    def accounting(self) -> None:
        bm = self.bm
        bm.check()
        held = self._held()
        for b in range(bm.num_blocks):
            assert bm.ref_count(b) == held[b], f"block {b}: ref {bm.ref_count(b)} != {held[b]}"
        # Every block is either free or held, never both and never lost.
        assert bm.num_free_blocks + len(held) == bm.num_blocks
        assert len(set(bm._free)) == bm.num_free_blocks
        assert not set(bm._free) & set(held)

    @invariant()
    def every_sequence_reads_its_own_kv(self) -> None:
        for sid, s in self.seqs.items():
            table = self.bm.block_table(sid)
            assert len(table) == self.bm.blocks_for(s.claimed)
            for p in range(s.computed):
                got = self.shadow[table[p // self.bs]][p % self.bs]
                assert got == tuple(s.tokens[:p + 1]), f"{sid} position {p}: foreign KV {got}"


    @invariant()
    def keys_are_committed_prefixes(self) -> None:
        """A sequence's prefix-cache keys name exactly its committed full blocks: never a
        block holding rolled-back (rejected draft) or unwritten tokens."""
        for sid, s in self.seqs.items():
            keys = self.bm._seqs[sid].keys
            if self.bm.prefix_caching:
                assert keys == self.bm._prefix_keys(s.tokens[:s.computed], s.computed // self.bs)
            else:
                assert keys == []

    @invariant()
    def cached_blocks_are_never_rewritten(self) -> None:
        """While a block is a prefix-cache entry its KV stays what it was when cached, so a hit
        can never read over-written (e.g. rolled-back, then rewritten) slots."""
        for key, b in self.bm._cached.items():
            seen = self.cached.get(key)
            if seen is None or seen[0] != b:
                self.cached[key] = (b, list(self.shadow[b]))
            else:
                assert self.shadow[b] == seen[1], f"cached block {b} was written over"


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- focused unit tests


def _run(bm: BlockManager, sid: str, tokens: list[int]) -> int:
    """Admit a whole prompt and commit it (as one prefill step would); returns the hits."""
    cached = bm.allocate_prompt(sid, tokens, len(tokens))
    assert cached is not None
    bm.commit(sid, tokens, len(tokens))
    bm.check()
    return cached


def test_lru_evicts_least_recently_freed_cached_block_first() -> None:
    bm = BlockManager(4, 2)
    _run(bm, "a", [1, 1])
    _run(bm, "b", [2, 2])
    bm.free("a")  # a's block is freed first, so it is the older cache entry
    bm.free("b")
    # Two never-cached blocks are free too; the next three blocks taken are those two, then
    # a's block (least recently freed), which evicts a's prefix but keeps b's.
    assert bm.allocate_prompt("c", [7, 7, 7, 7, 7, 7], 6) == 0
    assert bm.stats.evictions == 1
    bm.free("c")
    assert bm.allocate_prompt("b2", [2, 2, 0], 3) == 2  # b survived
    assert bm.allocate_prompt("a2", [1, 1, 0], 3) == 0  # a was evicted
    bm.check()


def test_never_cached_blocks_are_reused_before_cached_ones() -> None:
    bm = BlockManager(3, 2)
    _run(bm, "cached", [1, 1])
    assert bm.allocate_prompt("plain", [5], 1) == 0  # one partial block: never cached
    bm.free("cached")
    bm.free("plain")  # freed later, yet it goes ahead of the cached block in the queue
    # Two fresh blocks are needed; the free list has the plain block, the never-used block and
    # the cached one: the cached one must be the one left.
    assert bm.allocate_prompt("x", [9, 9, 9], 3) == 0
    assert bm.stats.evictions == 0
    bm.free("x")
    assert bm.allocate_prompt("again", [1, 1, 3], 3) == 2
    bm.check()


def test_tail_blocks_are_evicted_before_head_blocks() -> None:
    # A freed sequence's tail is only worth keeping with its head, so the tail goes first.
    bm = BlockManager(6, 1)
    _run(bm, "a", [1, 2, 3])
    bm.free("a")
    # Three never-cached blocks go first, then exactly one cached block: a's tail [.., 3].
    assert bm.allocate_prompt("x", [9, 9, 9, 9], 4) == 0
    assert bm.stats.evictions == 1
    bm.free("x")
    assert bm.allocate_prompt("again", [1, 2, 3, 4], 4) == 2  # head [1, 2] still cached
    bm.check()


def test_hit_statistics() -> None:
    bm = BlockManager(8, 2)
    _run(bm, "a", [1, 2, 3, 4, 5])
    assert (bm.stats.queries, bm.stats.hits) == (5, 0)
    assert bm.allocate_prompt("b", [1, 2, 3, 4, 6], 5) == 4
    assert (bm.stats.queries, bm.stats.hits) == (10, 4)
    assert bm.stats.hit_rate == pytest.approx(0.4)
    # Lookups that bypass the cache (prompt logprobs) are not queries.
    assert bm.allocate_prompt("c", [1, 2, 3, 4, 6], 5, use_cache=False) == 0
    assert (bm.stats.queries, bm.stats.hits) == (10, 4)
    assert BlockManager(1, 1).stats.hit_rate == 0.0


def test_whole_prompt_cached_still_leaves_one_token_to_compute() -> None:
    bm = BlockManager(8, 2)
    _run(bm, "a", [1, 2, 3, 4])
    # Both blocks of [1, 2, 3, 4] are cached, but the last token's logits are the first
    # prediction, so the last block is recomputed into a fresh block.
    assert bm.allocate_prompt("b", [1, 2, 3, 4], 4) == 2
    assert bm.block_table("b")[0] == bm.block_table("a")[0]
    assert bm.block_table("b")[1] != bm.block_table("a")[1]
    # A one-block prompt gets no hit at all.
    _run(bm, "c", [5, 6])
    assert bm.allocate_prompt("d", [5, 6], 2) == 0
    bm.check()


def test_failed_allocation_does_not_count_or_take_blocks() -> None:
    bm = BlockManager(2, 2)
    _run(bm, "a", [1, 2, 3])
    queries = bm.stats.queries
    assert bm.allocate_prompt("b", [1, 2, 3, 4, 5], 5) is None  # needs 2 new, 0 free
    assert bm.stats.queries == queries and not bm.has("b")
    assert not bm.allocate_slots("a", 5)
    assert bm.block_table("a") == [0, 1] and bm.num_free_blocks == 0
    bm.check()


def test_fork_copy_on_write() -> None:
    bm = BlockManager(8, 4)
    _run(bm, "p", [1, 2, 3, 4, 5, 6])  # one full block, one half-filled block
    bm.fork("p", "c")
    parent = list(bm.block_table("p"))
    assert bm.allocate_slots("c", 7)  # the child appends into the shared partial block
    (src, dst), = bm.take_copies()
    assert (src, bm.block_table("c")) == (parent[1], [parent[0], dst])
    assert bm.block_table("p") == parent  # the sharer's table is untouched
    assert (bm.ref_count(parent[0]), bm.ref_count(parent[1]), bm.ref_count(dst)) == (2, 1, 1)
    assert bm.allocate_slots("p", 7)  # no sharer left: the parent writes in place
    assert bm.take_copies() == []
    # A full shared block needs no copy: the next token starts a new block.
    assert bm.allocate_slots("p", 8)
    bm.commit("p", [1, 2, 3, 4, 5, 6, 7, 8], 8)
    bm.fork("p", "c2")
    assert bm.allocate_slots("c2", 9) and bm.take_copies() == []
    bm.check()


def test_copy_on_write_fails_cleanly_without_a_free_block() -> None:
    bm = BlockManager(2, 4)
    _run(bm, "p", [1, 2, 3, 4, 5])
    bm.fork("p", "c")
    assert not bm.allocate_slots("c", 6)  # the copy needs a block and none is free
    assert bm.take_copies() == []
    assert bm.block_table("c") == bm.block_table("p")
    bm.check()


def test_double_release_is_detected() -> None:
    bm = BlockManager(2, 1)
    _run(bm, "a", [1])
    block = bm.block_table("a")[0]
    bm._release(block)  # the sequence's only reference is gone...
    with pytest.raises(BlockManagerError, match="freed twice"):
        bm._release(block)  # ...so a second release is a double free, caught loudly


def test_hash_key_is_per_instance() -> None:
    # Unpredictable keys: another process (or manager) cannot precompute a colliding prefix.
    tokens = list(range(8))
    a, b = BlockManager(4, 4), BlockManager(4, 4)
    assert a._prefix_keys(tokens, 2) != b._prefix_keys(tokens, 2)
    assert not set(a._prefix_keys(tokens, 2)) & set(b._prefix_keys(tokens, 2))
    # An explicit key makes them reproducible, and the chain depends on the whole prefix.
    c, d = BlockManager(4, 4, hash_key=b"k"), BlockManager(4, 4, hash_key=b"k")
    assert c._prefix_keys(tokens, 2) == d._prefix_keys(tokens, 2)
    assert c._prefix_keys([9, *tokens[1:]], 2)[1] != c._prefix_keys(tokens, 2)[1]


def test_reset_prefix_cache_forgets_free_blocks_only() -> None:
    bm = BlockManager(8, 2)
    _run(bm, "held", [1, 2, 3])
    _run(bm, "gone", [4, 5, 6])
    bm.free("gone")
    bm.reset_prefix_cache()
    bm.check()
    assert bm.allocate_prompt("x", [4, 5, 6], 3) == 0  # freed blocks lost their entries
    assert bm.allocate_prompt("y", [1, 2, 6], 3) == 2  # a held block keeps its entry


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


# ---------------------------------------------------------------- speculative rollback


def test_rollback_across_a_block_boundary_frees_exactly_the_blocks_past_the_kept_tokens() -> None:
    bm = BlockManager(8, 4)
    _run(bm, "a", [1, 2, 3, 4, 5, 6])  # a full block and a half one
    head = list(bm.block_table("a"))
    # A speculative step: the 7th token plus 6 drafts, 13 slots over 4 blocks.
    assert bm.allocate_slots("a", 13)
    table = list(bm.block_table("a"))
    assert table[:2] == head and bm.num_free_blocks == 4
    bm.commit("a", [1, 2, 3, 4, 5, 6, 7], 7)  # the real token only
    # Two drafts kept (9 tokens): the third block stays, the fourth is given back.
    bm.truncate("a", 9)
    assert bm.block_table("a") == table[:3] and bm.num_free_blocks == 5
    assert bm.ref_count(table[3]) == 0
    bm.commit("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 9)
    bm.check()
    # Everything rejected again, from a block boundary: exactly the blocks past 8 go.
    assert bm.allocate_slots("a", 14)
    table = list(bm.block_table("a"))
    bm.truncate("a", 8)
    assert bm.block_table("a") == table[:2] and bm.num_free_blocks == 6
    assert all(bm.ref_count(b) == 0 for b in table[2:])
    bm.truncate("a", 8)  # no-op
    assert bm.block_table("a") == table[:2]
    bm.check()
    bm.free("a")
    assert bm.num_free_blocks == 8


def test_truncating_below_committed_blocks_or_past_the_claimed_end_raises() -> None:
    bm = BlockManager(8, 4)
    _run(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])  # two committed full blocks
    assert bm.allocate_slots("a", 12)
    before = (list(bm.block_table("a")), bm.num_free_blocks)
    with pytest.raises(BlockManagerError, match="committed"):
        bm.truncate("a", 7)
    with pytest.raises(BlockManagerError, match="cannot truncate"):
        bm.truncate("a", 13)
    assert (bm.block_table("a"), bm.num_free_blocks) == before  # nothing changed
    bm.truncate("a", 8)  # down to the committed blocks is fine
    assert bm.block_table("a") == before[0][:2]
    bm.check()


def test_truncate_on_a_forked_sequence_releases_only_its_own_references() -> None:
    bm = BlockManager(8, 4)
    _run(bm, "p", [1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.allocate_slots("p", 11)  # drafts' slots in a third block...
    bm.fork("p", "c")  # ...shared by a fork
    shared = list(bm.block_table("p"))
    free = bm.num_free_blocks
    bm.truncate("c", 8)
    assert bm.block_table("c") == shared[:2]
    assert bm.block_table("p") == shared  # the sharer keeps its table...
    assert [bm.ref_count(b) for b in shared] == [2, 2, 1]  # ...and its reference
    assert bm.num_free_blocks == free
    bm.truncate("p", 9)
    assert bm.block_table("p") == shared and bm.ref_count(shared[2]) == 1
    bm.truncate("p", 8)  # now the last holder: the block is free
    assert bm.ref_count(shared[2]) == 0 and bm.num_free_blocks == free + 1
    bm.check()
    bm.free("p")
    bm.free("c")
    assert bm.num_free_blocks == 8


def test_rolled_back_sequence_appending_into_a_shared_partial_block_copies_it() -> None:
    # No prefix caching, so nothing stops a rollback into a shared full block.
    bm = BlockManager(8, 4, prefix_caching=False)
    _run(bm, "p", [1, 2, 3, 4, 5, 6, 7, 8])
    bm.fork("p", "c")
    parent = list(bm.block_table("p"))
    assert bm.allocate_slots("c", 11)  # a fresh third block: no copy
    assert bm.take_copies() == []
    bm.truncate("c", 6)  # back into the shared second block, which is now partial for c
    assert bm.block_table("c") == parent and bm.ref_count(parent[1]) == 2
    # c's next token lands in slot 2 of a block p also holds (its positions 6, 7): copy first.
    assert bm.allocate_slots("c", 7)
    (src, dst), = bm.take_copies()
    assert src == parent[1] and bm.block_table("c") == [parent[0], dst]
    assert bm.block_table("p") == parent
    assert (bm.ref_count(parent[0]), bm.ref_count(parent[1]), bm.ref_count(dst)) == (2, 1, 1)
    # The same through a rollback of a block that a fork shares while it is partial.
    bm.free("c")
    assert bm.allocate_slots("p", 10)
    bm.fork("p", "d")
    bm.truncate("p", 9)  # p keeps the shared partial third block
    third = bm.block_table("p")[2]
    assert bm.ref_count(third) == 2
    assert bm.allocate_slots("p", 10)  # slot 9 is d's too: copy
    (src, dst), = bm.take_copies()
    assert src == third and bm.block_table("p")[2] == dst and bm.ref_count(third) == 1
    assert bm.allocate_slots("d", 11) and bm.take_copies() == []  # d alone now: in place
    bm.check()
    bm.free("p")
    bm.free("d")
    assert bm.num_free_blocks == 8
