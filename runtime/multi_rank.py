"""Loading a multi-rank engine (tensor or pipeline parallel) on rank 0: start the other ranks,
or join those torchrun started, and tear them all down if the load fails. How the ranks
start, connect and stop is runtime.cluster; what ranks 1..N-1 run is runtime.worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llm_engine.runtime.cluster import Cluster, default_threads, torchrun_env
from llm_engine.runtime.engine_dir import EngineFiles, EngineLoadError, load_engine_dir
from llm_engine.runtime.rank_files import check_rank_files, verify_rank_files

if TYPE_CHECKING:
    from llm_engine.runtime.engine import Engine, EngineConfig


def load_ranks(path: Path, device: str, config: EngineConfig, world_size: int,
               build: Callable[[EngineFiles, Cluster], Engine]) -> Engine:
    """Rank 0 of a multi-rank engine: spawn ranks 1..N-1 on this host, or, under a
    torchrun launch of the same size, join the ranks it started (runtime.worker); then
    `build` rank 0's Engine from its files and the cluster."""
    # Everything that can be checked here is, before any process starts.
    files = load_engine_dir(path, device=device, verify_checksums=False)
    check_rank_files(path, world_size)
    env = torchrun_env()
    if env is not None and env["world_size"] == world_size:
        if env["rank"] != 0:
            raise EngineLoadError("under torchrun, Engine.load runs on rank 0 only; the "
                                  "other ranks run `python -m runtime.worker ENGINE_DIR`")
        threads = config.threads or default_threads(env["local_world_size"])
        cluster = Cluster.join_torchrun(path, env, device)
    else:
        threads = config.threads or default_threads(world_size)
        cluster = Cluster.spawn(path, world_size, device, threads)
    torch.set_num_threads(threads)
    try:
        if config.verify_checksums:  # the workers verify theirs meanwhile
            verify_rank_files(path, files.meta, 0)
        cluster.connect(dataclasses.asdict(config), files.meta, files.plan,
                        config.collective_timeout)
        return build(files, cluster)
    except BaseException as e:
        cluster.abort(f"loading failed: {e}")  # no worker may outlive a failed load
        raise
