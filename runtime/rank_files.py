"""A multi-rank engine's directory: its rank layout (engine.json's "ranks" and "parallel":
tp x pp) and the files each rank reads (plan.rank<r>.json, weights.rank<r>.safetensors).

Rank 0 checks that every rank's files exist before any process starts; each rank then checksums
only its own shard (rank 0 also the shared files), so the ranks verify in parallel. Kept apart
from the processes (runtime.cluster) and the protocol (runtime.wire): rank 0 (runtime.engine)
and the workers (runtime.worker) read the same layout and check the same files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llm_engine.runtime.engine_dir import EngineLoadError, sha256_file


def engine_ranks(path: str | Path) -> int:
    """engine.json's "ranks" (1 when absent); an unreadable file reads as 1 so that
    load_engine_dir reports the problem."""
    try:
        meta = json.loads((Path(path) / "engine.json").read_text())
        ranks = meta.get("ranks", 1)
    except (OSError, ValueError, AttributeError):
        return 1
    if not isinstance(ranks, int) or ranks < 1:
        raise EngineLoadError(f"{path}/engine.json: 'ranks' must be a positive integer, got "
                              f"{ranks!r}; rebuild the engine")
    parallel = meta.get("parallel") or {}
    tp, pp = parallel.get("tp", ranks), parallel.get("pp", 1)
    if tp * pp != ranks:
        raise EngineLoadError(f"{path}/engine.json: {ranks} ranks with tp={tp}, pp={pp} is "
                              "not a layout this runtime runs; rebuild the engine")
    return ranks


def pipeline_stages(meta: dict[str, Any]) -> int:
    return int((meta.get("parallel") or {}).get("pp", 1))


def tensor_parallel(meta: dict[str, Any]) -> int:
    return int((meta.get("parallel") or {}).get("tp", meta.get("ranks", 1)))


def check_rank_files(path: Path, world_size: int) -> None:
    """Every rank's plan and weights exist: found here, before any process starts."""
    for rank in range(world_size):
        for name in (f"plan.rank{rank}.json", f"weights.rank{rank}.safetensors"):
            if not (path / name).is_file():
                raise EngineLoadError(f"{path / name} is missing; the {world_size}-rank engine "
                                      "is incomplete, rebuild it")


_RANK_FILE = re.compile(r"\.rank(\d+)\.")


def verify_rank_files(path: Path, meta: dict[str, Any], rank: int) -> None:
    """Checksum the files this rank reads: its own plan and weights, and (rank 0) the shared
    ones. Each rank hashes its own shard, so the ranks verify in parallel."""
    for rel, info in meta.get("files", {}).items():
        m = _RANK_FILE.search(rel)
        if (int(m.group(1)) if m else 0) != rank:
            continue
        if sha256_file(path / rel) != info["sha256"]:
            raise EngineLoadError(f"{path / rel} does not match its checksum in engine.json; "
                                  "the file is corrupt or was modified, rebuild the engine")


def engine_digest(path: Path) -> str:
    """Identifies the build: every rank must serve the same engine.json (multi-node ranks
    read their own copy of the directory)."""
    return sha256_file(path / "engine.json")
