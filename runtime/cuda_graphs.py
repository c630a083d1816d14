"""Decode steps replayed from CUDA graphs, one per batch-size bucket.

A decode step (every sequence adds one token) launches a few hundred small kernels; on a GPU
their launch overhead rivals their run time, so the step is captured once per bucket of batch
sizes and replayed. A graph replays fixed buffers, so a batch is padded up to its bucket:
padding rows get slot -1 (their K/V are not written), a one-token context and an all-zero block
table, and their logits are dropped. The kernels size their grids from tensor shapes only, never
from device values, which is what makes a step capturable.

The padding is the part that can go wrong, and it does not need a GPU: with `capture=False`
the same padded buffers run eagerly, which the CPU tests compare with the unpadded step.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, runner: Any, cache: Any, *, max_batch: int, max_blocks: int,
                 device: str | torch.device, capture: bool = True,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> None:
        self.runner = runner
        self.cache = cache
        self.device = torch.device(device)
        self.capture = capture
        self.max_blocks = max_blocks
        self.buckets = (*(b for b in buckets if b < max_batch), max_batch)
        self._static: dict[int, dict[str, torch.Tensor]] = {}
        self._graphs: dict[int, Any] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._pool = None

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def handles(self, feeds: dict[str, torch.Tensor]) -> bool:
        """A pure decode step that fits a bucket and the captured block-table width."""
        t = feeds["input_ids"].shape[-1]
        return (feeds["context_lens"].shape[0] == t == feeds["logits_indices"].shape[0]
                and self.bucket(t) is not None
                and feeds["block_tables"].shape[1] <= self.max_blocks)

    def _buffers(self, b: int) -> dict[str, torch.Tensor]:
        if b not in self._static:
            dev = self.device
            self._static[b] = {
                "input_ids": torch.zeros((1, b), dtype=torch.int64, device=dev),
                "position_ids": torch.zeros((1, b), dtype=torch.int64, device=dev),
                "slot_mapping": torch.full((b,), -1, dtype=torch.int64, device=dev),
                "block_tables": torch.zeros((b, self.max_blocks), dtype=torch.int32,
                                            device=dev),
                "context_lens": torch.ones((b,), dtype=torch.int32, device=dev),
                "query_start_loc": torch.arange(b + 1, dtype=torch.int32, device=dev),
                "logits_indices": torch.arange(b, dtype=torch.int64, device=dev),
            }
        return self._static[b]

    def _fill(self, static: dict[str, torch.Tensor], feeds: dict[str, torch.Tensor]) -> None:
        n = feeds["input_ids"].shape[-1]
        static["input_ids"][:, :n].copy_(feeds["input_ids"])
        static["input_ids"][:, n:].zero_()
        static["position_ids"][:, :n].copy_(feeds["position_ids"])
        static["position_ids"][:, n:].zero_()
        static["slot_mapping"][:n].copy_(feeds["slot_mapping"])
        static["slot_mapping"][n:].fill_(-1)
        width = feeds["block_tables"].shape[1]
        static["block_tables"].zero_()
        static["block_tables"][:n, :width].copy_(feeds["block_tables"])
        static["context_lens"][:n].copy_(feeds["context_lens"])
        static["context_lens"][n:].fill_(1)

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [1, n, vocab] of a decode step (call `handles` first)."""
        n = feeds["input_ids"].shape[-1]
        b = self.bucket(n)
        assert b is not None
        static = self._buffers(b)
        self._fill(static, feeds)
        if not self.capture:
            return self.runner.run(static, self.cache)[0][:, :n]
        if b not in self._graphs:
            self._capture(b, static)
        self._graphs[b].replay()
        return self._outputs[b][:, :n]

    def _capture(self, b: int, static: dict[str, torch.Tensor]) -> None:
        # Warm up on a side stream first: the first launch of a Triton kernel compiles it,
        # which must not happen inside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.runner.run(static, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self._outputs[b] = self.runner.run(static, self.cache)[0]
        self._graphs[b] = graph
