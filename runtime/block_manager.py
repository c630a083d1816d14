"""Paged KV-cache block accounting: free list, block tables, reference counts, prefix caching.

The cache is `num_blocks` fixed-size blocks of `block_size` token slots. A sequence owns a block
table (its logical blocks in order). Blocks are reference counted, so a block can sit in the
tables of several sequences at once: prefix-cache hits share full blocks, and `fork` shares a
whole table, with copy-on-write when a sharer appends into a shared, partially filled block.

Prefix caching keys every *full* block by a hash chained over (parent hash, token ids), so a
key names the whole prefix up to that block, not just the block's own tokens. The hash is a
keyed BLAKE2b with a per-process random key: with a predictable hash, one client could craft
a prompt colliding with another's prefix and have its requests read the wrong KV.

A block whose reference count drops to zero goes back on the free list but keeps its contents
and its key, so a later request with the same prefix can take it back; allocation takes the
least recently freed block first, which makes eviction LRU. Blocks that were never cached go to
the front of that queue (they are useless to keep), and a sequence's tail blocks are freed
before its head blocks, because a tail is only useful if its head is also kept.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field


class BlockManagerError(RuntimeError):
    """An internal invariant broke (double free, unknown sequence): a runtime bug."""


@dataclass
class PrefixStats:
    queries: int = 0  # prompt tokens looked up in the prefix cache
    hits: int = 0  # of which found cached
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class _Block:
    id: int
    ref: int = 0
    key: bytes | None = None  # prefix-cache key, set once the block is full and computed


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # keys of its full, committed blocks
    root: bytes = b""  # the chain's start: b"", or its cache salt's key
    num_tokens: int = 0  # slots claimed so far


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True,
                 hash_key: bytes | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._key = hash_key if hash_key is not None else os.urandom(32)
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Free blocks (ref == 0) in eviction order: the first is taken first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self._seqs: dict[str, _Seq] = {}
        self._copies: list[tuple[int, int]] = []
        self.stats = PrefixStats()

    # ---- queries --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        return self._seqs[seq_id].blocks

    def has(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def ref_count(self, block: int) -> int:
        return self._blocks[block].ref

    # ---- hashing --------------------------------------------------------------------------
    def _chain(self, parent: bytes, tokens: list[int]) -> bytes:
        h = hashlib.blake2b(key=self._key, digest_size=16)
        h.update(parent)
        h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in tokens))
        return h.digest()

    def _root(self, salt: bytes) -> bytes:
        """Where a sequence's chain starts: a salt (a tenant, a request's cache_salt) gives
        its own chain, so only sequences with the same salt can share prefix blocks (and see
        each other's hits in timings or metrics)."""
        if not salt:
            return b""
        h = hashlib.blake2b(key=self._key, digest_size=16, person=b"cache-salt")
        h.update(salt)
        return h.digest()

    def _prefix_keys(self, token_ids: list[int], max_blocks: int, root: bytes = b""
                     ) -> list[bytes]:
        keys, parent, bs = [], root, self.block_size
        for i in range(min(max_blocks, len(token_ids) // bs)):
            parent = self._chain(parent, token_ids[i * bs:(i + 1) * bs])
            keys.append(parent)
        return keys

    # ---- allocation ---------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.key is not None:  # evicting a cached block
            if self._cached.get(block.key) == block_id:
                del self._cached[block.key]
            block.key = None
            self.stats.evictions += 1
        block.ref = 1
        return block_id

    def _hold(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref == 0:
            del self._free[block_id]
        block.ref += 1

    def allocate_prompt(self, seq_id: str, token_ids: list[int], num_new_tokens: int,
                        *, use_cache: bool = True, salt: bytes = b"") -> int | None:
        """Start `seq_id`: reuse cached prefix blocks of `token_ids`, then make room for
        `num_new_tokens` more. Returns how many leading tokens are already computed (cache
        hits), or None, changing nothing, when the free blocks do not suffice.

        At least one token is always left to compute: its logits are the first prediction.
        `salt`: share blocks only with sequences of the same salt (see `_root`)."""
        if seq_id in self._seqs:
            raise BlockManagerError(f"sequence {seq_id} already has blocks")
        hits: list[int] = []
        keys: list[bytes] = []
        root = self._root(salt)
        if self.prefix_caching and use_cache:
            for key in self._prefix_keys(token_ids, (len(token_ids) - 1) // self.block_size,
                                         root):
                block = self._cached.get(key)
                if block is None:
                    break
                hits.append(block)
                keys.append(key)
        cached_tokens = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, len(token_ids) - cached_tokens)
        need = self.blocks_for(cached_tokens + num_new_tokens) - len(hits)
        # Hit blocks sitting on the free list stop being free once held.
        reclaimed = sum(1 for b in hits if self._blocks[b].ref == 0)
        if need > self.num_free_blocks - reclaimed:
            return None
        if self.prefix_caching and use_cache:
            self.stats.queries += len(token_ids)
            self.stats.hits += cached_tokens
        for b in hits:
            self._hold(b)
        seq = _Seq(blocks=list(hits), keys=keys, num_tokens=cached_tokens + num_new_tokens,
                   root=root)
        seq.blocks += [self._take_free() for _ in range(need)]
        self._seqs[seq_id] = seq
        return cached_tokens

    def allocate_slots(self, seq_id: str, num_tokens: int) -> bool:
        """Make the sequence's table cover `num_tokens` slots; False, changing nothing, when
        the free blocks do not suffice. Appending into a shared partial block copies it first
        (see `take_copies`)."""
        seq = self._seqs[seq_id]
        need = self.blocks_for(num_tokens) - len(seq.blocks)
        cow = self._needs_cow(seq, num_tokens)
        if max(need, 0) + cow > self.num_free_blocks:
            return False
        if cow:
            old = seq.blocks[-1]
            new = self._take_free()
            self._copies.append((old, new))
            self._release(old)
            seq.blocks[-1] = new
        seq.blocks += [self._take_free() for _ in range(max(need, 0))]
        seq.num_tokens = max(seq.num_tokens, num_tokens)
        return True

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Roll the sequence back to its first `num_tokens` slots (a speculative step's
        rejected draft tokens): blocks past them are released, the last one first. Slots
        left in the kept last block are overwritten by later writes; prefix-cache keys exist
        only for committed (accepted) full blocks, which lie below `num_tokens`."""
        seq = self._seqs[seq_id]
        if num_tokens > seq.num_tokens:
            raise BlockManagerError(f"sequence {seq_id}: cannot truncate {seq.num_tokens} "
                                    f"slots to {num_tokens}")
        if len(seq.keys) * self.block_size > num_tokens:
            raise BlockManagerError(f"sequence {seq_id}: truncating to {num_tokens} would drop "
                                    "committed blocks")
        keep = self.blocks_for(num_tokens)
        for b in reversed(seq.blocks[keep:]):
            self._release(b)
        del seq.blocks[keep:]
        seq.num_tokens = num_tokens

    def _needs_cow(self, seq: _Seq, num_tokens: int) -> bool:
        """True when the next write lands in a partially filled last block that other
        sequences also hold."""
        partial = seq.num_tokens % self.block_size != 0
        return (partial and num_tokens > seq.num_tokens
                and self._blocks[seq.blocks[-1]].ref > 1)

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give `child_id` the parent's table, sharing every block (parallel sampling)."""
        parent = self._seqs[parent_id]
        if child_id in self._seqs:
            raise BlockManagerError(f"sequence {child_id} already has blocks")
        for b in parent.blocks:
            self._hold(b)
        self._seqs[child_id] = _Seq(list(parent.blocks), list(parent.keys),
                                    num_tokens=parent.num_tokens, root=parent.root)

    def take_copies(self) -> list[tuple[int, int]]:
        """Block copies (src, dst) the executor must do before the next step writes."""
        copies, self._copies = self._copies, []
        return copies

    def commit(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """Record that the first `num_computed` tokens' KV is written: full blocks among them
        become prefix-cache entries other sequences can share."""
        if not self.prefix_caching:
            return
        seq = self._seqs[seq_id]
        bs = self.block_size
        parent = seq.keys[-1] if seq.keys else seq.root
        for i in range(len(seq.keys), num_computed // bs):
            parent = self._chain(parent, token_ids[i * bs:(i + 1) * bs])
            seq.keys.append(parent)
            block = self._blocks[seq.blocks[i]]
            # The same prefix computed twice concurrently: keep the first copy as the entry.
            if parent not in self._cached and block.key is None:
                block.key = parent
                self._cached[parent] = block.id

    # ---- release --------------------------------------------------------------------------
    def _release(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref <= 0:
            raise BlockManagerError(f"block {block_id} freed twice")
        block.ref -= 1
        if block.ref == 0:
            self._free[block_id] = None
            if block.key is None:  # nothing worth keeping: reuse it first
                self._free.move_to_end(block_id, last=False)

    def free(self, seq_id: str) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        for b in reversed(seq.blocks):
            self._release(b)

    def reset_prefix_cache(self) -> None:
        for block in self._blocks:
            if block.key is not None and block.ref == 0:
                block.key = None
        self._cached = {k: b for k, b in self._cached.items() if self._blocks[b].key == k}

    # ---- checking ---------------------------------------------------------------------------
    def check(self) -> None:
        """Assert the accounting invariants (tests call this after every operation)."""
        refs = [0] * self.num_blocks
        for seq in self._seqs.values():
            for b in seq.blocks:
                refs[b] += 1
        for block in self._blocks:
            if block.ref != refs[block.id]:
                raise BlockManagerError(f"block {block.id}: ref {block.ref} != {refs[block.id]}")
            if (block.ref == 0) != (block.id in self._free):
                raise BlockManagerError(f"block {block.id}: free list disagrees with ref count")
        for key, b in self._cached.items():
            if self._blocks[b].key != key:
                raise BlockManagerError(f"cache entry for block {b} has a stale key")
