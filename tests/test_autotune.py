"""GEMM autotuning: the selection logic (timed by a stand-in clock here; on a GPU build host
by `autotune.gpu_time`), and a build targeting CUDA on a host without one."""

from __future__ import annotations

import json

import pytest

from llm_engine.builder import autotune
from llm_engine.builder.build import BuildOptions, build_engine
from llm_engine.kernels.triton import gemm
from llm_engine.runtime import Engine, EngineLoadError


def _params():
    p = gemm.params("linear", {}, [(7, 96), (160, 96)], ["float16", "float16"], "float16")
    assert p is not None
    return p


def test_tune_picks_the_fastest_total_over_row_counts():
    p = _params()
    cands = autotune.candidates(p)
    assert len(cands) > 3 and all(set(c) == set(gemm.TILE_KEYS) for c in cands)
    target = cands[2]

    def clock(trial, rows):  # the third candidate is fastest at every row count
        return 1e-6 * rows * (1 if all(trial[k] == target[k] for k in target) else 2)

    best, table = autotune.tune(p, clock)
    assert {k: best[k] for k in gemm.TILE_KEYS} == target
    assert {k: v for k, v in best.items() if k not in gemm.TILE_KEYS} == \
        {k: v for k, v in p.items() if k not in gemm.TILE_KEYS}
    assert len(table) == len(cands)


def test_tune_skips_tilings_that_fail_and_keeps_defaults_if_all_fail():
    p = _params()
    first = autotune.candidates(p)[0]

    def clock(trial, rows):
        if all(trial[k] == first[k] for k in first):
            raise RuntimeError("out of resources: shared memory")
        return 1e-6

    best, table = autotune.tune(p, clock)
    assert any("error" in row for row in table)
    assert {k: best[k] for k in gemm.TILE_KEYS} != first

    def broken(trial, rows):
        raise RuntimeError("no")

    assert autotune.tune(p, broken)[0] == p


def test_cuda_target_builds_on_a_cpu_host(checkpoints, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU path")
    ckpt, _ = checkpoints("llama")
    path = build_engine(BuildOptions(model=str(ckpt), output=tmp_path / "e", device="cuda",
                                     max_batch_tokens=64))
    report = json.loads((path / "report.json").read_text())
    codegen = next(p for p in report["passes"] if p["name"] == "codegen")
    assert any("autotune skipped" in n for n in codegen["notes"])
    plan = json.loads((path / "plan.rank0.json").read_text())
    tiles = [info["params"] for info in plan["kernels"].values() if info["family"] == "gemm"]
    cuda_first = gemm.configs(None, tiles[0]["N"], tiles[0]["K"], "cuda",
                              dtype=tiles[0]["a_dtype"])[0]
    assert {k: tiles[0][k] for k in gemm.TILE_KEYS} == cuda_first
    with pytest.raises(EngineLoadError, match="built for cuda"):
        Engine.load(path)
