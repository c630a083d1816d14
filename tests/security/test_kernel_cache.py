"""Attacks on the rendered-kernel cache (a directory on a shared host): a pre-created shared
directory, bytecode planted beside a kernel, and a link planted where a kernel is written.
Each is refused or has no effect; what runs is always the verified source text."""

from __future__ import annotations

import importlib._bootstrap_external as bootstrap
import importlib.util
import os
import secrets
import sys
from pathlib import Path

import pytest

from llm_engine.kernels import codegen


def _source(tag: str) -> str:
    # unique per test: load_kernel returns an already-loaded module of the same source
    return f"VALUE = 'verified'\n# {tag} {secrets.token_hex(8)}\n"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("LLM_ENGINE_KERNEL_CACHE", str(path))
    return path


def test_default_cache_is_private_to_the_user(tmp_path, monkeypatch):
    monkeypatch.delenv("LLM_ENGINE_KERNEL_CACHE", raising=False)
    monkeypatch.setattr(codegen.tempfile, "gettempdir", lambda: str(tmp_path))
    module = codegen.load_kernel(_source("default"))
    path = Path(module.__file__).parent
    assert path == tmp_path / f"llm-engine-kernels-{os.getuid()}"
    assert path.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("attack", ["world-writable", "other-owner", "symlink"])
def test_a_cache_directory_others_control_is_refused(attack, tmp_path, monkeypatch):
    path = tmp_path / "shared"
    if attack == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.mkdir(mode=0o700)
        if attack == "world-writable":
            path.chmod(0o777)
        else:
            if os.getuid() != 0:
                pytest.skip("making a directory another user's needs root")
            os.chown(path, 4242, 4242)
    monkeypatch.setenv("LLM_ENGINE_KERNEL_CACHE", str(path))
    source = _source(attack)
    with pytest.raises(codegen.KernelCacheError, match="only this user"):
        codegen.load_kernel(source)
    assert codegen.kernel_name(source) not in sys.modules


def test_planted_bytecode_is_never_run(cache, tmp_path):
    """Python's importer prefers a __pycache__ .pyc whose recorded source mtime and size match
    the .py beside it; such a file, planted with a payload, must not run."""
    source = _source("pyc")
    path = cache / f"{codegen.kernel_name(source)}.py"
    path.write_text(source)
    marker = tmp_path / "payload-ran"
    payload = compile(f"open({str(marker)!r}, 'w').close()\nVALUE = 'payload'\n",
                      str(path), "exec")
    st = path.stat()
    pyc = Path(importlib.util.cache_from_source(str(path)))
    pyc.parent.mkdir()
    pyc.write_bytes(bootstrap._code_to_timestamp_pyc(payload, st.st_mtime, st.st_size))
    module = codegen.load_kernel(source)
    assert module.VALUE == "verified" and not marker.exists()


def test_planted_link_is_replaced_not_followed(cache, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    source = _source("link")
    path = cache / f"{codegen.kernel_name(source)}.py"
    path.symlink_to(victim)
    module = codegen.load_kernel(source)
    assert module.VALUE == "verified"
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and path.read_text() == source


def test_what_runs_is_the_verified_text_not_the_file(cache, tmp_path):
    """A file changed on disk between the check and the run (or planted with the kernel's
    name and other contents) is overwritten, and the module runs the text it was given;
    inspect (which Triton uses to read a kernel) sees that text too."""
    import inspect

    source = _source("swap") + "def f():\n    return 1\n"
    path = cache / f"{codegen.kernel_name(source)}.py"
    path.write_text("VALUE = 'planted'\ndef f():\n    return 2\n")
    module = codegen.load_kernel(source)
    assert module.VALUE == "verified" and module.f() == 1
    path.write_text("def f():\n    return 3\n")  # changed after the load
    assert "return 1" in inspect.getsource(module.f)
