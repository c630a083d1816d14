"""The data plane of a multi-rank engine: `Comm`, what the plan's `all_reduce` and `all_gather`
ops call (`ctx.comm`), and `make_comm`, which gives a rank the communicator of its
tensor-parallel group.

The group it runs on is the data process group (runtime.cluster.data_group: gloo on CPU, NCCL
on CUDA), with the collective timeout; over gloo the collectives are point-to-point exchanges
(see Comm). Kept apart from the control messages (runtime.wire) and the processes
(runtime.cluster): it runs inside every step, on whatever group it is given.
"""

from __future__ import annotations

from typing import Any

import torch

from llm_engine.runtime.rank_files import tensor_parallel


class Comm:
    """What the plan's collective ops call (`ctx.comm`): sums and gathers over the ranks.

    Over gloo both are one exchange of point-to-point messages with every peer, summed here
    in rank order: gloo's own allreduce took 1.5-2.9 ms for a few KiB on a 2-core host, the
    exchange 0.3-0.5 ms, and a model runs two per layer. Every rank adds the same tensors in
    the same order, so all ranks get bitwise the same sum (and so the same KV and tokens).
    NCCL's collectives are the fast path on GPUs and are used as they are."""

    def __init__(self, group: Any, rank: int, world_size: int, *, p2p: bool = True,
                 peers: list[int] | None = None) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.p2p = p2p
        self.peers = peers if peers is not None else list(range(world_size))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.p2p:
            parts = self._exchange(x)
            out = parts[0] + parts[1]
            for part in parts[2:]:
                out += part
            return out
        # The collective works in place; x may be read again by the plan or be a read-only
        # mmapped weight, so reduce a contiguous copy.
        y = x.clone(memory_format=torch.contiguous_format)
        self.group.allreduce([y]).wait()
        return y

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.p2p:
            return self._exchange(x)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self.group.allgather([parts], [x]).wait()
        return parts

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x, in rank order. All sends and receives are posted before any is
        waited for, so no order of arrival can deadlock."""
        x = x.contiguous()
        parts = [x if r == self.rank else torch.empty_like(x) for r in self.peers]
        pending = []
        for r, part in zip(self.peers, parts):
            if r != self.rank:
                pending.append(self.group.send([x], r, 0))
                pending.append(self.group.recv([part], r, 0))
        for work in pending:
            work.wait()
        return parts


def make_comm(group: Any, rank: int, meta: dict[str, Any], device: str) -> Comm:
    """The communicator of `rank`'s tensor-parallel group: the ranks of its pipeline stage
    (rank = stage * tp + shard), or all ranks without pipelining."""
    tp = tensor_parallel(meta)
    world = int(meta.get("ranks", 1))
    stage = rank // tp
    peers = list(range(stage * tp, stage * tp + tp))
    # NCCL's collectives span the whole group: with stages, exchange among the peers instead.
    p2p = not device.startswith("cuda") or len(peers) != world
    return Comm(group, rank, world, p2p=p2p, peers=peers)
