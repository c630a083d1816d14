"""Bad input to `engine build`: one line naming the problem and the fix, exit code 2, and no
engine (not even a half one) left on disk."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from llm_engine.builder.cli import main


def _build(*args: str):
    result = CliRunner().invoke(main, ["build", *args])
    return result.exit_code, result.stderr.strip()


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    # Progress lines may come first; the error itself is exactly the last line.
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and err.count("error: ") == 1, err
    err = last
    for needle in needles:
        assert needle in err, err


def _no_engine(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp")]


@pytest.fixture
def ckpt_copy(checkpoints, tmp_path):
    src, _ = checkpoints("llama")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_model_path(tmp_path):
    code, err = _build("--model", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    _one_line_error(code, err, "not found", "named model")
    _no_engine(tmp_path)


def test_unknown_named_model(tmp_path):
    code, err = _build("--model", "gpt-17", "--output", str(tmp_path / "out"))
    _one_line_error(code, err, "gpt-17", "smollm2")


def test_config_without_architectures(ckpt_copy, tmp_path):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    del cfg["architectures"]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    code, err = _build("--model", str(ckpt_copy), "--output", str(tmp_path / "out"))
    _one_line_error(code, err, "architectures", "LlamaForCausalLM")
    _no_engine(tmp_path)


def test_corrupt_config(ckpt_copy, tmp_path):
    (ckpt_copy / "config.json").write_text("{not json")
    code, err = _build("--model", str(ckpt_copy), "--output", str(tmp_path / "out"))
    _one_line_error(code, err, "config.json", "not valid JSON")


def test_missing_weights(ckpt_copy, tmp_path):
    for f in ckpt_copy.glob("*.safetensors"):
        f.unlink()
    code, err = _build("--model", str(ckpt_copy), "--output", str(tmp_path / "out"))
    _one_line_error(code, err, "no *.safetensors")
    _no_engine(tmp_path)


def test_pickle_only_checkpoint_is_refused(ckpt_copy, tmp_path):
    for f in ckpt_copy.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    code, err = _build("--model", str(ckpt_copy), "--output", str(tmp_path / "out"))
    _one_line_error(code, err, "pickle", "safetensors")


def test_truncated_weights(ckpt_copy, tmp_path):
    (weights,) = ckpt_copy.glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, err = _build("--model", str(ckpt_copy), "--output", str(tmp_path / "out"))
    _one_line_error(code, err, weights.name)
    _no_engine(tmp_path)


def test_existing_output_needs_force(checkpoints, tmp_path):
    ckpt, _ = checkpoints("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = _build("--model", str(ckpt), "--output", str(out), "--max-batch-tokens", "64")
    _one_line_error(code, err, "already exists", "--force")
    # --force replaces engines only: a directory that is not an engine is never deleted.
    code, err = _build("--model", str(ckpt), "--output", str(out), "--force")
    _one_line_error(code, err, "not an engine")
    assert (out / "keep.txt").read_text() == "user data"


def test_force_replaces_an_engine(engines, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(engines("llama"), out)
    (out / "engine.json").write_text("{}")
    ckpt = json.loads((engines("llama") / "engine.json").read_text())["model"]["source"]
    code, err = _build("--model", ckpt, "--output", str(out), "--force",
                       "--max-batch-tokens", "64")
    assert code == 0, err
    assert json.loads((out / "engine.json").read_text())["format_version"] == 1


def test_disk_full_mid_write_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    import llm_engine.builder.build as build_mod

    real = build_mod.write_safetensors_streaming

    def full_disk(path, specs, tensors, on_tensor=None):
        def stream():
            for i, item in enumerate(tensors):
                if i == 3:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                yield item
        return real(path, specs, stream(), on_tensor)

    monkeypatch.setattr(build_mod, "write_safetensors_streaming", full_disk)
    ckpt, _ = checkpoints("llama")
    code, err = _build("--model", str(ckpt), "--output", str(tmp_path / "out"))
    _one_line_error(code, err, "No space left on device", "nothing was left behind")
    _no_engine(tmp_path)


def test_bad_disable_pass_name(checkpoints, tmp_path):
    ckpt, _ = checkpoints("llama")
    code, err = _build("--model", str(ckpt), "--output", str(tmp_path / "out"),
                       "--disable-pass", "fuse.nonsense")
    _one_line_error(code, err, "fuse.nonsense")
