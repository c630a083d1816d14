"""A draft engine: a second, cheaper engine directory (an int4 build of the same model, a
smaller model of its family) that proposes tokens for the target to verify.

It keeps its own paged KV cache and block table per request, mirroring the target's
requests: each round it first catches up on the tokens the target accepted since its last
round (one chunk per request, all requests in one step), then runs one decode step per
further draft token. What it drafted but the target rejected is rolled back the next round,
by comparing its tokens with the target's.

Greedy requests draft the draft model's argmax (a point-mass proposal); sampled requests
draw from the draft's own distribution under the request's temperature and filters and keep
those probabilities (q) for the rejection rule (runtime.speculative.verify).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_engine.runtime.backend import choose_backend, make_runner
from llm_engine.runtime.block_manager import BlockManager
from llm_engine.runtime.engine_dir import EngineLoadError, load_engine_dir
from llm_engine.runtime.executor import Executor, KVCache, KVCacheSpec
from llm_engine.runtime.request import Request
from llm_engine.runtime.sampling import _exponentials, _filter
from llm_engine.runtime.scheduler import Chunk


@dataclass
class DraftRound:
    drafts: list[list[int]]
    q: list[torch.Tensor | None]  # [k, V] per request, or None (point-mass proposals)
    seconds: float  # the draft model's time for the round
    depth: int  # draft steps run after the catch-up step


class DraftModel:
    def __init__(self, path: str | Path, config: Any, device: str, num_blocks: int,
                 target_meta: dict[str, Any]) -> None:
        files = load_engine_dir(path, device=device, verify_checksums=config.verify_checksums)
        _check_compatible(files.meta, target_meta, path)
        self.path = Path(path)
        self.vocab_size = files.meta.get("generation", {}).get("vocab_size") or 0
        self.max_seq_len = files.meta.get("generation", {}).get("max_seq_len") \
            or files.meta["build"]["max_seq_len"]
        backend = choose_backend(config.kernels, device, files)
        # The draft's pool does not spin: between its steps the target runs, and idle threads
        # spinning on the same cores slow it (measured: the draft's own step 11.7 -> 17 ms
        # and the target's 25 -> 45 ms with both spinning, 2 cores).
        runner = make_runner(files, config, backend, device, spinning=False)
        layers = files.plan["kv_cache"]["layers"]
        self.cache = KVCache(KVCacheSpec(num_blocks, config.block_size, layers), device)
        self.blocks = BlockManager(num_blocks, config.block_size, prefix_caching=False)
        self.executor = Executor(runner, self.cache, device)
        self.backend = backend
        self.seqs: dict[str, Request] = {}  # request id -> its mirror
        self.base: dict[str, int] = {}  # request id -> the target's length at its last round
        self.generators: dict[str, torch.Generator] = {}

    # ---- per request ---------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        self.seqs.pop(request_id, None)
        self.base.pop(request_id, None)
        self.generators.pop(request_id, None)
        self.blocks.free(request_id)

    def _sync(self, req: Request, k: int) -> Request | None:
        """The request's mirror, rolled back to the tokens it shares with the target, with
        slots for this round (None: the draft cache is full; it drafts nothing)."""
        mirror = self.seqs.get(req.id)
        if mirror is not None:
            # The target only appends: tokens before the last round's drafts are shared;
            # of the drafts the draft computed, those the target kept still hold.
            base = self.base[req.id]
            keep = base
            while keep < min(mirror.num_computed, len(req.all_ids)) and \
                    mirror.all_ids[keep] == req.all_ids[keep]:
                keep += 1
            mirror.num_computed = min(keep, len(req.all_ids) - 1)
            mirror.all_ids = list(req.all_ids)
            self.blocks.truncate(req.id, mirror.num_computed)
            if self.blocks.allocate_slots(req.id, len(req.all_ids) + k - 1):
                self.base[req.id] = len(req.all_ids)
                return mirror
            self.release(req.id)
            return None
        mirror = Request(req.id, list(req.prompt_ids), req.params, self.max_seq_len)
        mirror.all_ids = list(req.all_ids)
        if self.blocks.allocate_prompt(req.id, mirror.all_ids, len(mirror.all_ids) + k - 1,
                                       use_cache=False) is None:
            return None
        if not self.blocks.allocate_slots(req.id, len(req.all_ids) + k - 1):
            self.blocks.free(req.id)
            return None
        self.seqs[req.id] = mirror
        self.base[req.id] = len(req.all_ids)
        if req.params.seed is not None:
            g = torch.Generator(device=self.cache.kv_caches[0][0].device)
            g.manual_seed((req.params.seed * 1_000_003 + 17) % 2**63)
            self.generators[req.id] = g
        return mirror

    # ---- a round ----------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, reqs: list[Request], ks: list[int]) -> DraftRound:
        start = time.perf_counter()
        drafts: list[list[int]] = [[] for _ in reqs]
        probs: list[list[torch.Tensor]] = [[] for _ in reqs]
        live: list[tuple[int, Request]] = []
        for i, (req, k) in enumerate(zip(reqs, ks, strict=True)):
            k = min(k, self.max_seq_len - len(req.all_ids))
            if k < 1:
                continue
            mirror = self._sync(req, k)
            if mirror is not None:
                live.append((i, mirror))
        depth = 0
        # A constrained request drafts under its grammar, on a copy of its matcher: guesses
        # the target's mask would forbid are never made (they could not be kept).
        guides = {i: reqs[i].matcher.copy() for i, _ in live if reqs[i].matcher is not None}
        chunks = [Chunk(m, m.num_computed, len(m.all_ids) - m.num_computed, True, False)
                  for _, m in live]
        while chunks:
            tables = [self.blocks.block_table(c.req.id) for c in chunks]
            logits = self.executor.run(chunks, tables, []).logits
            if guides:
                from llm_engine.runtime.structured.matcher import apply_masks

                logits = apply_masks(logits, [guides.get(i) for i, _ in live])
            nxt = []
            for row, chunk, (i, mirror) in zip(logits, chunks, live, strict=True):
                token, q = self._draw(row, reqs[i], mirror.id)
                mirror.num_computed = chunk.start + chunk.num_tokens
                guide = guides.get(i)
                if guide is not None and not _follow(guide, token):
                    continue  # the grammar is complete (or allows nothing this model has)
                drafts[i].append(token)
                if q is not None:
                    probs[i].append(q)
                mirror.all_ids.append(token)
                if len(drafts[i]) < min(ks[i], self.max_seq_len - len(reqs[i].all_ids)):
                    nxt.append((i, mirror))
            live = nxt
            chunks = [Chunk(m, m.num_computed, 1, True, False) for _, m in live]
            depth += bool(chunks)
        q = [torch.stack(p) if p else None for p in probs]
        return DraftRound(drafts, q, time.perf_counter() - start, depth)

    def _draw(self, row: torch.Tensor, req: Request, rid: str
              ) -> tuple[int, torch.Tensor | None]:
        params = req.params
        if params.greedy:
            return int(row.argmax()), None
        y = _filter(row[None].float().clone(), [params])
        p = y.softmax(dim=-1)[0]
        state = _DrawState(self.generators.get(rid))
        token = int((p / _exponentials((1, p.shape[0]), [state], p.device)[0]).argmax())
        return token, p


def _follow(guide: Any, token: int) -> bool:
    """Advances a draft's grammar copy past `token`; False when the token cannot be a draft
    (an end of sequence, which ends the grammar, or a token it forbids)."""
    if not guide.allowed(token) or token in guide.eos_token_ids:
        return False
    guide.advance(token)
    return True


@dataclass
class _DrawState:
    """What `_exponentials` reads of a sampler state: the generator."""

    generator: torch.Generator | None


def _check_compatible(draft: dict[str, Any], target: dict[str, Any], path: Any) -> None:
    """A draft must speak the target's token ids: same tokenizer vocabulary."""
    dv = draft.get("generation", {}).get("vocab_size")
    tv = target.get("generation", {}).get("vocab_size")
    if not dv or not tv or dv > tv:
        raise EngineLoadError(f"draft engine {path}: its vocabulary ({dv}) does not fit the "
                              f"target's ({tv}); a draft engine needs the target's tokenizer")
    dt, tt = _vocab_digest(draft), _vocab_digest(target)
    if dt and tt and dt != tt:
        raise EngineLoadError(f"draft engine {path}: its tokenizer differs from the target's; "
                              "draft with a model of the same family")



def _vocab_digest(meta: dict[str, Any]) -> str | None:
    """The checksum of the engine's tokenizer.json (its vocabulary), from its manifest."""
    rel = meta.get("tokenizer")
    entry = meta.get("files", {}).get(f"{rel}/tokenizer.json") if rel else None
    return entry.get("sha256") if isinstance(entry, dict) else None
