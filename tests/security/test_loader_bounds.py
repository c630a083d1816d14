"""Plan values the loader uses as sizes and counts: zero or absurd ones (`head_dim: 0`, a
pointwise kernel of rank 10**9, a negative head count) used to raise ZeroDivisionError deep in
the runtime or run for minutes. Each now ends in EngineLoadError, within seconds, under every
`kernels=` choice."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import pytest

from llm_engine.runtime import Engine, EngineLoadError


def _tamper(engines, tmp_path, edit):
    path = tmp_path / "engine"
    shutil.copytree(engines("llama"), path)
    plan_path, meta_path = path / "plan.rank0.json", path / "engine.json"
    plan, meta = json.loads(plan_path.read_text()), json.loads(meta_path.read_text())
    edit(plan, meta)
    plan_path.write_text(json.dumps(plan))
    data = plan_path.read_bytes()
    meta["files"]["plan.rank0.json"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                        "bytes": len(data)}
    meta_path.write_text(json.dumps(meta))
    return path


def _attention_attr(key, value):
    def edit(plan, meta):
        for node in plan["nodes"]:
            if node["op"] == "paged_attention":
                node["attrs"][key] = value
        for layer in plan["kv_cache"]["layers"] + meta["kv_cache"]["layers"]:
            if key in layer:
                layer[key] = value
    return edit


def _kernel_param(family, key, value):
    def edit(plan, meta):
        for info in plan["kernels"].values():
            if info["family"] == family and key in info["params"]:
                info["params"][key] = value
    return edit


CASES = {
    "head_dim-0": _attention_attr("head_dim", 0),
    "num_kv_heads-negative": _attention_attr("num_kv_heads", -2),
    "pointwise-rank-huge": _kernel_param("pointwise", "rank", 10**9),
    "num_warps-huge": _kernel_param("embedding", "num_warps", 10**6),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kernels", ["reference", "triton", "onnx", "auto"])
def test_absurd_plan_values_end_in_a_load_error(engines, tmp_path, case, kernels):
    path = _tamper(engines, tmp_path, CASES[case])
    start = time.monotonic()
    with pytest.raises(EngineLoadError):
        Engine.load(path, kernels=kernels, kv_cache_memory=1 << 20)
    assert time.monotonic() - start < 20
