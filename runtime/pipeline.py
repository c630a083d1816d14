"""Pipeline-parallel execution: one stage of layers per rank, micro-batches in flight.

A step's chunks are independent sequences, so rank 0 splits them into micro-batches
(`EngineConfig.pp_microbatches`, default one per stage) and sends every micro-batch's inputs to
all ranks up front (the control broadcasts of runtime.wire, MICRO for all but the last,
STEP for the last). Then each stage runs its micro-batches in order: receive the residual
stream from the stage before (point-to-point, tag = micro-batch), run its plan, post the send to
the next stage (the last stage sends logits back to rank 0) and go on to the next micro-batch
without waiting, so while stage 1 runs micro-batch 0, stage 0 already runs micro-batch 1.

Each rank times its own compute; the workers send theirs to rank 0 after each step, and rank 0
keeps the bubble fraction: the share of rank-time spent waiting,
1 - sum(busy) / (ranks * wall). With M micro-batches and S equal stages its floor is
(S - 1) / (M + S - 1): the fill and drain of each step. Overlapping consecutive steps (vLLM's
virtual engines) would remove that too, and is not done here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_engine.kernels.dtypes import to_torch_dtype
from llm_engine.kernels.symbolic import eval_shape

RECV_PREFIX = "pp."
_BUSY_TAG = 1 << 20  # the per-step compute-time report of a worker, apart from data tags


@dataclass
class StageIO:
    """What a stage receives and sends: its `pp.*` plan inputs and its outputs."""

    recv: list[tuple[str, list, torch.dtype]]  # (input name, symbolic shape, dtype)
    sends: int  # number of outputs

    @staticmethod
    def of(plan: dict[str, Any]) -> StageIO:
        recv = [(i["name"], i["shape"], to_torch_dtype(i["dtype"])) for i in plan["inputs"]
                if i["name"].startswith(RECV_PREFIX)]
        return StageIO(recv, len(plan["outputs"]))


def sizes_of(feeds: dict[str, torch.Tensor]) -> dict[str, int]:
    return {"T": feeds["input_ids"].shape[-1], "N": feeds["logits_indices"].shape[0]}


def logits_spec(path: Path, last_rank: int) -> tuple[list, torch.dtype]:
    """Shape and dtype of the logits the last stage sends back to rank 0."""
    plan = json.loads((path / f"plan.rank{last_rank}.json").read_text())
    out = plan["outputs"][0]
    node = next(n for n in plan["nodes"] if n["name"] == out)
    return node["shape"], to_torch_dtype(node["dtype"])


def split_microbatches(n_chunks: int, tokens: list[int], m: int) -> list[range]:
    """Contiguous groups of chunks with about equal token counts, at most m of them."""
    m = max(1, min(m, n_chunks))
    total = sum(tokens)
    groups, start, acc = [], 0, 0
    for i, t in enumerate(tokens):
        acc += t
        left = m - len(groups) - 1  # groups still to open after this one
        if left > 0 and acc >= total * (len(groups) + 1) / m and n_chunks - i - 1 >= left:
            groups.append(range(start, i + 1))
            start = i + 1
    groups.append(range(start, n_chunks))
    return [g for g in groups if len(g)]


@dataclass
class PipelineStats:
    steps: int = 0
    wall_s: float = 0.0
    busy_s: list[float] = field(default_factory=list)  # per rank

    def add(self, wall: float, busy: list[float]) -> None:
        self.steps += 1
        self.wall_s += wall
        if not self.busy_s:
            self.busy_s = [0.0] * len(busy)
        self.busy_s = [a + b for a, b in zip(self.busy_s, busy)]

    def to_json(self) -> dict[str, Any]:
        stages = len(self.busy_s)
        bubble = 1 - sum(self.busy_s) / (stages * self.wall_s) if self.wall_s and stages else None
        return {"steps": self.steps, "wall_s": round(self.wall_s, 4),
                "busy_s": [round(b, 4) for b in self.busy_s],
                "bubble_fraction": None if bubble is None else round(bubble, 4)}


class Stage:
    """This rank's stage: run its plan on each micro-batch between a receive and a send."""

    def __init__(self, rank: int, stages: int, group: Any, runner: Any, cache: Any,
                 io: StageIO, tp: int = 1) -> None:
        """With tensor parallelism inside stages (`tp` > 1), rank = stage * tp + shard: a
        shard talks to the same shard of the neighbouring stages, and shard 0 of the last
        stage returns the logits (every shard holds them after the all-gather)."""
        self.rank, self.stages, self.group, self.tp = rank, stages, group, tp
        self.stage, self.shard = divmod(rank, tp)
        self.runner, self.cache, self.io = runner, cache, io
        self.pending: list[Any] = []  # sends in flight, with the tensors they read

    def receive(self, feeds: dict[str, torch.Tensor], tag: int) -> dict[str, torch.Tensor]:
        sizes = sizes_of(feeds)
        got = {}
        for name, shape, dtype in self.io.recv:
            buf = torch.empty(eval_shape(shape, sizes), dtype=dtype)
            self.group.recv([buf], self.rank - self.tp, tag).wait()
            got[name] = buf
        return got

    def run(self, feeds: dict[str, torch.Tensor], tag: int) -> tuple[list[torch.Tensor], float]:
        """Run one micro-batch; returns the outputs and the compute seconds."""
        inputs = {**feeds, **self.receive(feeds, tag)} if self.stage > 0 else feeds
        start = time.perf_counter()
        outs = [o.contiguous() for o in self.runner.run(inputs, self.cache)]
        busy = time.perf_counter() - start
        if self.stage < self.stages - 1:
            dst: int | None = self.rank + self.tp
        else:
            dst = 0 if self.shard == 0 else None
        if dst is not None and dst != self.rank:
            for t in outs:
                self.pending.append((self.group.send([t], dst, tag), t))
        return outs, busy

    def drain(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()

    # ---- worker side ----
    def serve_step(self, micro: list[tuple[dict[str, torch.Tensor], list]]) -> None:
        """A worker's share of one step (the micro-batches rank 0 announced)."""
        self.cache.copy_blocks(micro[0][1])
        busy = 0.0
        with torch.inference_mode():
            for tag, (feeds, _) in enumerate(micro):
                busy += self.run(feeds, tag)[1]
        self.drain()
        self.group.send([torch.tensor([busy], dtype=torch.float64)], 0, _BUSY_TAG).wait()

    # ---- rank 0 side ----
    def run_step(self, micro_feeds: list[dict[str, torch.Tensor]], copies: list,
                 logits_shape: list, logits_dtype: torch.dtype, stats: PipelineStats
                 ) -> list[torch.Tensor]:
        """Rank 0: run stage 0 on every micro-batch, then collect the logits of each."""
        start = time.perf_counter()
        self.cache.copy_blocks(copies)
        busy = 0.0
        with torch.inference_mode():
            for tag, feeds in enumerate(micro_feeds):
                busy += self.run(feeds, tag)[1]
        logits = []
        for tag, feeds in enumerate(micro_feeds):
            buf = torch.empty(eval_shape(logits_shape, sizes_of(feeds)), dtype=logits_dtype)
            self.group.recv([buf], (self.stages - 1) * self.tp, tag).wait()
            logits.append(buf)
        self.drain()
        times = [busy]
        for r in range(1, self.stages * self.tp):
            t = torch.empty(1, dtype=torch.float64)
            self.group.recv([t], r, _BUSY_TAG).wait()
            times.append(float(t))
        stats.add(time.perf_counter() - start, times)
        return logits
