"""Turn a scheduled step into the plan's inputs, run it, and hand back the logits rows.

The plan takes one flat token batch (all sequences' new tokens end to end) plus the paged
attention metadata: each token's position and cache slot, each sequence's block table,
context length and start offset in the batch, and which rows need logits (only the last row
of a sequence that samples, unless prompt logprobs are wanted), so the LM head runs on a
handful of rows instead of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llm_engine.kernels.dtypes import to_torch_dtype
from llm_engine.runtime.plan import PlanRunner
from llm_engine.runtime.scheduler import Chunk


@dataclass
class KVCacheSpec:
    num_blocks: int
    block_size: int
    layers: list[dict[str, Any]]

    @staticmethod
    def bytes_per_block(layers: list[dict[str, Any]], block_size: int) -> int:
        total = 0
        for layer in layers:
            itemsize = torch.empty((), dtype=to_torch_dtype(layer["dtype"])).element_size()
            total += 2 * block_size * layer["num_kv_heads"] * layer["head_dim"] * itemsize
        return total


class KVCache:
    """Per layer a (K, V) pair of [num_blocks, block_size, kv_heads, head_dim] tensors; the
    attention ops find them through the context object passed to the plan, as the collective
    ops find `comm` (runtime.comm.Comm on a multi-rank engine)."""

    def __init__(self, spec: KVCacheSpec, device: str = "cpu", comm: Any = None) -> None:
        self.spec = spec
        self.comm = comm  # the plan's collectives reach the other ranks through it (or None)
        self.kv_caches = []
        # Layers alike (the usual case) share one [L, 2, blocks, block, kv_heads, head_dim]
        # tensor, of which each layer's K and V are views: the ONNX backend reads the whole
        # cache as one input and writes a step's K/V for every layer in one store.
        self.stacked: torch.Tensor | None = None
        kinds = {(la["num_kv_heads"], la["head_dim"], la["dtype"]) for la in spec.layers}
        if len(kinds) == 1:
            kvh, hd, dt = kinds.pop()
            self.stacked = torch.zeros((len(spec.layers), 2, spec.num_blocks, spec.block_size,
                                        kvh, hd), dtype=to_torch_dtype(dt), device=device)
            self.kv_caches = [(self.stacked[i, 0], self.stacked[i, 1])
                              for i in range(len(spec.layers))]
            return
        for layer in spec.layers:
            shape = (spec.num_blocks, spec.block_size, layer["num_kv_heads"], layer["head_dim"])
            dtype = to_torch_dtype(layer["dtype"])
            self.kv_caches.append((torch.zeros(shape, dtype=dtype, device=device),
                                   torch.zeros(shape, dtype=dtype, device=device)))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        device = self.kv_caches[0][0].device
        src = torch.tensor([s for s, _ in copies], device=device)
        dst = torch.tensor([d for _, d in copies], device=device)
        for k, v in self.kv_caches:
            k, v = _raw(k), _raw(v)
            k[dst] = k[src]
            v[dst] = v[src]


def _raw(cache: torch.Tensor) -> torch.Tensor:
    """Block copies are bitwise: an fp8 cache is copied as bytes, as not every device's
    indexing kernels take float8 dtypes."""
    return cache.view(torch.uint8) if cache.is_floating_point() and cache.element_size() == 1 \
        else cache


@dataclass
class StepLogits:
    """Logits rows of one step: `rows[i]` are the rows of chunk i ([0] rows if none)."""

    logits: torch.Tensor  # [num_rows, vocab], float32
    rows: list[slice]


class Executor:
    def __init__(self, runner: PlanRunner, cache: KVCache, device: str = "cpu",
                 graphs: Any = None, cluster: Any = None, pipeline: Any = None,
                 microbatches: int = 1) -> None:
        self.runner = runner
        self.cache = cache
        self.device = torch.device(device)
        self.graphs = graphs  # DecodeGraphs: decode steps replayed from CUDA graphs
        self.cluster = cluster  # rank 0 of a multi-rank engine: the other ranks get each step
        self.block_size = cache.spec.block_size
        # Rank 0 of a pipeline-parallel engine: (runtime.pipeline.Stage, logits shape and
        # dtype, PipelineStats).
        self.pipeline = pipeline
        self.microbatches = microbatches

    def build_feeds(self, chunks: list[Chunk], block_tables: list[list[int]]
                    ) -> tuple[dict[str, torch.Tensor], list[slice]]:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        starts = [0]
        lens: list[int] = []
        rows: list[int] = []
        row_slices: list[slice] = []
        for chunk, table in zip(chunks, block_tables):
            first, n = chunk.start, chunk.num_tokens
            ids += chunk.token_ids
            positions = range(first, first + n)
            pos += positions
            slots += [table[p // bs] * bs + p % bs for p in positions]
            row0 = starts[-1]
            starts.append(row0 + n)
            lens.append(first + n)
            before = len(rows)
            if chunk.all_rows:
                rows += range(row0, row0 + n)
            elif chunk.sample:
                rows.append(row0 + n - 1)
            row_slices.append(slice(before, len(rows)))
        width = max(len(t) for t in block_tables)

        # numpy builds the step's small tensors in about half torch.tensor's time
        def tensor(values, dtype=np.int64) -> torch.Tensor:
            return torch.from_numpy(np.array(values, dtype=dtype))

        feeds = {
            "input_ids": tensor([ids]),
            "position_ids": tensor([pos]),
            "slot_mapping": tensor(slots),
            # One tensor from padded lists: a tensor per sequence costs more than the copy.
            "block_tables": tensor([t + [0] * (width - len(t)) for t in block_tables],
                                   np.int32),
            "context_lens": tensor(lens, np.int32),
            "query_start_loc": tensor(starts, np.int32),
            "logits_indices": tensor(rows),
        }
        return feeds, row_slices

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], block_tables: list[list[int]],
            copies: list[tuple[int, int]]) -> StepLogits:
        if self.pipeline is not None:
            return self._run_pipeline(chunks, block_tables, copies)
        feeds, row_slices = self.build_feeds(chunks, block_tables)
        wants_rows = feeds["logits_indices"].numel() > 0
        if not wants_rows:
            # The plan still has to run to write KV; ask for one row and drop it.
            feeds["logits_indices"] = torch.tensor([0])
        if self.cluster is not None:
            self.cluster.send_step(feeds, copies)
        logits = self.execute(feeds, copies)
        if not wants_rows:
            return StepLogits(torch.empty(0, 0), row_slices)
        return StepLogits(logits.reshape(-1, logits.shape[-1]).float(), row_slices)

    def _run_pipeline(self, chunks: list[Chunk], block_tables: list[list[int]],
                      copies: list[tuple[int, int]]) -> StepLogits:
        from llm_engine.runtime.pipeline import split_microbatches
        from llm_engine.runtime.wire import MICRO, STEP

        stage, shape, dtype, stats = self.pipeline
        groups = split_microbatches(len(chunks), [c.num_tokens for c in chunks],
                                    self.microbatches)
        micro, slices, wants = [], [], []
        for i, g in enumerate(groups):
            feeds, rows = self.build_feeds([chunks[j] for j in g], [block_tables[j] for j in g])
            wants.append(feeds["logits_indices"].numel() > 0)
            if not wants[-1]:
                feeds["logits_indices"] = torch.tensor([0])
            self.cluster.send_step(feeds, copies if i == 0 else [],
                                   STEP if i == len(groups) - 1 else MICRO)
            micro.append(feeds)
            slices.append(rows)
        logits = stage.run_step(micro, copies, shape, dtype, stats)
        parts, row_slices, at = [], [], 0
        for rows, want, out in zip(slices, wants, logits):
            n = out.shape[-2] if want else 0
            if want:
                parts.append(out.reshape(-1, out.shape[-1]).float())
            row_slices += [slice(at + s.start, at + s.stop) for s in rows]
            at += n
        if not parts:
            return StepLogits(torch.empty(0, 0), row_slices)
        return StepLogits(torch.cat(parts), row_slices)

    @torch.inference_mode()
    def execute(self, feeds: dict[str, torch.Tensor], copies: list[tuple[int, int]]
                ) -> torch.Tensor:
        """Run the plan on host-built feeds; every rank of a multi-rank engine runs the same
        feeds and copies (rank 0 builds them, the workers receive them)."""
        self.cache.copy_blocks(copies)
        if self.device.type != "cpu":
            feeds = {k: v.to(self.device, non_blocking=True) for k, v in feeds.items()}
        if self.graphs is not None and self.graphs.handles(feeds):
            return self.graphs.run(feeds)
        return self.runner.run(feeds, self.cache)[0]
