"""Paths an engine directory names cannot lead out of it: manifest entries that are absolute or
climb with `..`, links (a symlinked tokenizer/chat_template.jinja made any host file readable
through /tokenize and /detokenize), files the manifest does not list, pipes (a read that never
ends), a tokenizer or ONNX path outside, and ONNX external data outside the directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from llm_engine.runtime import Engine, EngineLoadError


def _copy(engines, tmp_path) -> Path:
    path = tmp_path / "engine"
    shutil.copytree(engines("llama"), path)
    return path


def _manifest(path: Path, edit) -> None:
    meta = json.loads((path / "engine.json").read_text())
    edit(meta)
    (path / "engine.json").write_text(json.dumps(meta))


def _relist(path: Path, rel: str) -> None:
    """Record `rel`'s current size and digest, as an attacker rewriting the manifest would."""
    data = (path / rel).read_bytes()
    _manifest(path, lambda m: m["files"].__setitem__(
        rel, {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}))


def _load(path: Path, kernels: str = "reference") -> Engine:
    return Engine.load(path, kernels=kernels, kv_cache_memory=1 << 20)


@pytest.mark.parametrize("rel", ["../outside.txt", "/etc/hostname", "tokenizer/../../x",
                                 "kernels/./../../x", "a\\\\..\\\\b"])
def test_manifest_entries_must_stay_inside(engines, tmp_path, rel):
    path = _copy(engines, tmp_path)
    (tmp_path / "outside.txt").write_text("secret")
    _manifest(path, lambda m: m["files"].__setitem__(rel, {"sha256": "0" * 64, "bytes": 6}))
    with pytest.raises(EngineLoadError, match=r"leaves the engine directory|not a relative"):
        _load(path)


def test_symlinked_chat_template_is_refused(engines, tmp_path):
    path = _copy(engines, tmp_path)
    secret = tmp_path / "host-secret.txt"
    secret.write_text("{{ 'the host file' }}")
    template = path / "tokenizer" / "chat_template.jinja"
    template.unlink()
    template.symlink_to(secret)
    _relist(path, "tokenizer/chat_template.jinja")  # digest of the target: checksums agree
    with pytest.raises(EngineLoadError, match="symbolic link"):
        _load(path)


def test_symlinked_directory_is_refused(engines, tmp_path):
    path = _copy(engines, tmp_path)
    outside = tmp_path / "tok"
    shutil.move(path / "tokenizer", outside)
    (path / "tokenizer").symlink_to(outside, target_is_directory=True)
    with pytest.raises(EngineLoadError, match="symbolic link"):
        _load(path)


def test_unlisted_file_is_refused(engines, tmp_path):
    path = _copy(engines, tmp_path)
    (path / "tokenizer" / "extra_template.jinja").write_text("{{ 1 }}")
    with pytest.raises(EngineLoadError, match=r"not in engine\.json's file list"):
        _load(path)


def test_a_pipe_is_refused_without_reading_it(engines, tmp_path):
    path = _copy(engines, tmp_path)
    report = path / "report.json"
    report.unlink()
    os.mkfifo(report)  # opening it to read would block forever
    start = time.monotonic()
    with pytest.raises(EngineLoadError, match="not a regular file"):
        _load(path)
    assert time.monotonic() - start < 5


def test_tokenizer_path_outside_is_refused(engines, tmp_path):
    path = _copy(engines, tmp_path)
    shutil.copytree(path / "tokenizer", tmp_path / "other-tokenizer")
    _manifest(path, lambda m: m.__setitem__("tokenizer", "../other-tokenizer"))
    with pytest.raises(EngineLoadError, match="leaves the engine directory"):
        _load(path)


def test_onnx_graph_elsewhere_is_not_used(engines, tmp_path):
    path = _copy(engines, tmp_path)
    shutil.copy(path / "model.onnx", tmp_path / "model.onnx")
    _manifest(path, lambda m: m["cpu_graph"].__setitem__("file", "../model.onnx"))
    with pytest.raises(EngineLoadError, match="no ONNX graph"):
        _load(path, kernels="onnx")


def test_onnx_external_data_outside_is_refused(engines, tmp_path):
    """model.onnx names where its weights are; one pointing out of the directory is refused
    by onnxruntime (>= 1.24.1, the floor pyproject.toml sets and the runtime checks)."""
    import onnx

    path = _copy(engines, tmp_path)
    (tmp_path / "secret.bin").write_bytes(os.urandom(1 << 20))
    model = onnx.load(path / "model.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    onnx.save(model, path / "model.onnx")
    _relist(path, "model.onnx")
    with pytest.raises(EngineLoadError, match=r"escapes model directory|External data path"):
        _load(path, kernels="onnx")


def test_a_giant_listed_file_is_refused_before_it_is_read(engines, tmp_path):
    """A sparse file costs nothing to plant but its size to hash; a kind of file the builder
    writes small (here report.json) has a size bound checked before any read."""
    path = _copy(engines, tmp_path)
    with open(path / "report.json", "r+b") as f:
        f.truncate(300 << 20)  # sparse: no disk used
    _manifest(path, lambda m: m["files"].__setitem__(
        "report.json", {"sha256": "0" * 64, "bytes": 300 << 20}))
    start = time.monotonic()
    with pytest.raises(EngineLoadError, match="over the 256 MiB"):
        _load(path)
    assert time.monotonic() - start < 5


def _weights_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def _rewrite_weights(path: Path, header: dict, data_bytes: int) -> None:
    """A weights file of `header` whose data is `data_bytes` of (sparse) zeros."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    f = path / "weights.rank0.safetensors"
    with open(f, "wb") as out:
        out.write(len(blob).to_bytes(8, "little") + blob)
        out.truncate(8 + len(blob) + data_bytes)


@pytest.mark.parametrize("case", ["appended", "undeclared-tensor", "overlapping"])
def test_a_giant_weights_file_is_refused_before_it_is_hashed(engines, tmp_path, case):
    """Weights have no size bound of their own (a model is as large as it is), so their bound
    is the plan's weight list: the header must declare exactly the plan's tensors, tiling the
    data with no gap or overlap up to the end of the file. Each forged 64 GiB sparse file
    would take minutes to hash; it is refused from its header in well under a second."""
    path = _copy(engines, tmp_path)
    f = path / "weights.rank0.safetensors"
    _, header = _weights_header(f)
    meta = header.pop("__metadata__", None)
    end = max(info["data_offsets"][1] for info in header.values())
    giant = 64 << 30
    if case == "appended":  # the genuine header, and 64 GiB of data after the tensors
        _rewrite_weights(path, {"__metadata__": meta, **header}, giant)
        match = "its tensors end at"
    elif case == "undeclared-tensor":  # a tensor the plan does not have covers the rest
        header["padding"] = {"dtype": "U8", "shape": [giant - end],
                             "data_offsets": [end, giant]}
        _rewrite_weights(path, header, giant)
        match = "disagree on the weight list"
    else:  # one tensor's offsets claim the whole file
        name = next(iter(header))
        header[name]["data_offsets"] = [0, giant]
        _rewrite_weights(path, header, giant)
        match = "offsets"
    size = f.stat().st_size
    _manifest(path, lambda m: m["files"].__setitem__(
        "weights.rank0.safetensors", {"sha256": "0" * 64, "bytes": size}))
    start = time.monotonic()
    with pytest.raises(EngineLoadError, match=match):
        _load(path)
    assert time.monotonic() - start < 2
