"""The KV-cache budget: how many blocks a rank's memory holds, by default a share of what the
host has free. Rank 0 (runtime.engine) and the other ranks (runtime.worker) size their caches
here, and all then take the smallest count (block ids must mean the same on every rank).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from llm_engine.runtime.engine_dir import EngineLoadError
from llm_engine.runtime.executor import KVCacheSpec

if TYPE_CHECKING:
    from llm_engine.runtime.engine import EngineConfig

DEFAULT_KV_CACHE_BYTES = 2 << 30


def available_memory() -> int:
    """Bytes the OS would hand out now (MemAvailable), the CPU analogue of free GPU memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_cache_blocks(layers: list[dict[str, Any]], config: EngineConfig,
                    ranks_here: int = 1) -> int:
    """Blocks this rank's KV-cache budget holds. The default budget is shared by the ranks on
    one host; an explicit kv_cache_memory is per rank (like memory per GPU)."""
    per_block = KVCacheSpec.bytes_per_block(layers, config.block_size)
    budget = config.kv_cache_memory
    if budget is None:
        budget = min(DEFAULT_KV_CACHE_BYTES,
                     int(config.kv_cache_fraction * available_memory()) // ranks_here)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise EngineLoadError(f"KV cache budget of {budget} bytes holds no block "
                              f"({per_block} bytes each); raise --kv-cache-memory")
    return num_blocks
