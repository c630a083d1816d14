"""Engine.load refuses unusable engine directories with a message that says what is wrong and
what to do. Every case edits a copy of the engine: the session fixture is shared."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from llm_engine.runtime import Engine, EngineLoadError
from llm_engine.runtime.engine_dir import FORMAT_VERSION, runtime_version
from llm_engine.runtime.plan import PlanError

WEIGHTS = "weights.rank0.safetensors"


@pytest.fixture
def copy(engines, tmp_path) -> Path:
    out = tmp_path / "engine"
    shutil.copytree(engines("llama"), out)
    return out


def _load(path, **options) -> Engine:
    return Engine.load(path, **{"kv_cache_memory": 1 << 20, **options})


def _edit_meta(path: Path, edit) -> None:
    meta = json.loads((path / "engine.json").read_text())
    edit(meta)
    (path / "engine.json").write_text(json.dumps(meta))


def test_the_copy_loads(copy):
    engine = _load(copy)
    assert engine.blocks.num_blocks > 0 and engine.tokenizer is not None


def test_not_an_engine_directory(copy, tmp_path):
    for path in (tmp_path / "missing", copy / "engine.json"):
        with pytest.raises(EngineLoadError, match=r"is not an engine directory.*engine build"):
            _load(path)


def test_missing_engine_json(copy):
    (copy / "engine.json").unlink()
    with pytest.raises(EngineLoadError, match=r"engine\.json is missing; rebuild"):
        _load(copy)


def test_corrupt_engine_json(copy):
    (copy / "engine.json").write_text('{"format_version": 1,')
    with pytest.raises(EngineLoadError, match=r"engine\.json is not valid JSON"):
        _load(copy)


@pytest.mark.parametrize("rel", [WEIGHTS, "plan.rank0.json", "tokenizer/tokenizer.json"])
def test_missing_listed_file(copy, rel):
    (copy / rel).unlink()
    message = re.escape(f"{rel} is missing; the engine is incomplete")
    with pytest.raises(EngineLoadError, match=message):
        _load(copy)


def test_checksum_mismatch(copy):
    weights = copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    message = re.escape(WEIGHTS) + " does not match its checksum.*rebuild"
    with pytest.raises(EngineLoadError, match=message):
        _load(copy)
    _load(copy, verify_checksums=False)  # the size still matches: opt-out skips hashing
    weights.write_bytes(bytes(data[:-4]))  # a truncated file is caught without hashing
    with pytest.raises(EngineLoadError, match=r"does not match its checksum"):
        _load(copy, verify_checksums=False)


def test_newer_or_missing_format_version(copy):
    _edit_meta(copy, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(EngineLoadError, match=rf"format v{FORMAT_VERSION + 1} is newer than "
                                              r"this runtime reads.*upgrade llm-engine"):
        _load(copy)
    _edit_meta(copy, lambda m: m.pop("format_version"))
    with pytest.raises(EngineLoadError, match=r"no format_version"):
        _load(copy)


def test_newer_builder_major_is_refused(copy):
    ours = runtime_version()
    major = int(ours.split(".")[0])
    newer = f"{major + 1}.0.0"
    _edit_meta(copy, lambda m: m.update(builder_version=newer))
    with pytest.raises(EngineLoadError) as err:
        _load(copy)
    assert f"built by llm-engine {newer}, this runtime is {ours}; upgrade llm-engine" in \
        str(err.value)
    # A newer minor or patch of the same major loads, as does an engine that names no version.
    _edit_meta(copy, lambda m: m.update(builder_version=f"{major}.99.7"))
    _load(copy)
    _edit_meta(copy, lambda m: m.pop("builder_version"))
    _load(copy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_engine_on_a_host_without_cuda(copy):
    # engine.json is not in its own file list, so editing it needs no checksum fix-up.
    assert "engine.json" not in json.loads((copy / "engine.json").read_text())["files"]
    _edit_meta(copy, lambda m: m["target"].update(device="cuda"))
    with pytest.raises(EngineLoadError, match=r"built for cuda but no CUDA device.*--device cpu"):
        _load(copy)
    _edit_meta(copy, lambda m: m["target"].update(device="cpu"))
    with pytest.raises(EngineLoadError, match="'cuda' requested but CUDA is not available"):
        _load(copy, device="cuda")


def test_kv_cache_budget_below_one_block(copy):
    with pytest.raises(EngineLoadError, match=r"holds no block.*raise --kv-cache-memory"):
        _load(copy, kv_cache_memory=1)
    per_block = 2 * 2 * 16 * 2 * 12 * 4  # layers * (K, V) * block * kv heads * head_dim * fp32
    assert _load(copy, kv_cache_memory=per_block).blocks.num_blocks == 1


def test_unknown_plan_op(copy):
    plan_file = copy / "plan.rank0.json"
    plan = json.loads(plan_file.read_text())
    node = next(n for n in plan["nodes"] if n["op"] not in ("input", "weight"))
    node["op"] = "warp_drive"
    plan_file.write_text(json.dumps(plan))
    data = plan_file.read_bytes()
    _edit_meta(copy, lambda m: m["files"]["plan.rank0.json"].update(
        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))
    with pytest.raises(PlanError, match=r"unknown op 'warp_drive'.*newer llm-engine"):
        _load(copy)


def test_unknown_option_lists_the_valid_ones(copy):
    with pytest.raises(TypeError, match=r"unknown engine option.*kv_cache_memory"):
        Engine.load(copy, kv_cache_bytes=1 << 20)
