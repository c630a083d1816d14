"""The package installs under one namespace, `llm_engine`, and claims no other top-level name:
the repository's builder/, runtime/, kernels/ and templates/ folders map to llm_engine.builder,
... (pyproject.toml). Hugging Face's `kernels` package, which transformers imports, is the one
`import kernels` finds."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"builder": "llm_engine.builder", "runtime": "llm_engine.runtime",
           "kernels": "llm_engine.kernels", "templates": "llm_engine.templates",
           "llm_engine": "llm_engine"}


def test_pyproject_lists_every_package_folder():
    """The package list is written by hand (a package-dir mapping is not discoverable): every
    folder holding Python code must be in it, with an __init__.py (a folder without one is left
    out of a wheel by setuptools: builder/passes once was)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("*.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
            assert (init.parent / "__init__.py").is_file(), f"{init.parent} has no __init__.py"
    assert sorted(config["packages"]) == sorted(found)


def test_no_top_level_name_of_ours_is_importable():
    """The tests run with the repository root off sys.path (tests/conftest.py), so the folders
    are reachable only as llm_engine.*; `kernels` is HF's (a dependency of transformers) or
    nothing. (A virtual environment inside the checkout, `.venv/`, holds HF's `kernels` under
    the root too: only the repository's own folders count.)"""
    for name in ("builder", "runtime", "kernels", "templates"):
        spec = importlib.util.find_spec(name)
        assert spec is None or not Path(spec.origin or "").is_relative_to(ROOT / name), name
    import transformers.integrations.hub_kernels  # noqa: F401  (imports HF's kernels)


def test_strict_mode_fails_the_run_when_a_test_dependency_is_missing(tmp_path):
    """CI runs with LLM_ENGINE_STRICT_DEPS=all: a missing dependency (here graphviz's `dot`,
    hidden by a PATH without it) ends the run with an error naming it and how to install it,
    instead of skipping the tests that need it."""
    env = {**os.environ, "LLM_ENGINE_STRICT_DEPS": "all",
           "PATH": str(Path(sys.executable).parent)}
    out = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:randomly",
                          str(ROOT / "tests" / "test_symbolic.py")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode != 0
    assert "dot: apt-get install graphviz" in out.stdout + out.stderr


def _setuptools_version() -> tuple[int, ...]:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return (0,)
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit())


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, f"{cmd}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_installs_and_runs_beside_hf_kernels(tmp_path, checkpoints):
    """A non-editable install of the wheel, in a fresh venv beside transformers and HF's
    `kernels`: `engine build` and `engine run` work from an unrelated directory, `import
    kernels` is HF's, and every llm_engine module comes from the wheel. The venv sees this
    interpreter's packages (torch, transformers, kernels) to stay offline and fast; this
    project's own editable install is among them, which is why every module's file is checked
    to lie in the venv (a module the wheel lacks would otherwise be found in the repository)."""
    # From a copy: setuptools builds in the source tree, and a stale build/ there would put
    # files in the wheel that the package list no longer names.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "engines", "tests", "benchmarks"))
    wheels = tmp_path / "wheels"
    # This interpreter's setuptools builds it when it can (offline); one too old to build
    # wheels by itself (< 70.1) leaves it to pip's isolated build, which fetches a new one.
    offline = ["--no-build-isolation"] if _setuptools_version() >= (70, 1) else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q",
          "-w", str(wheels), str(source)], cwd=tmp_path)
    wheel = next(wheels.glob("llm_engine-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python, engine = env_dir / "bin" / "python", env_dir / "bin" / "engine"
    # --no-deps: the dependencies come from this interpreter's site-packages (offline)
    _run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)])
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                ).stdout.strip()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["HF_HUB_OFFLINE"] = "1"
    ckpt, _ = checkpoints("llama")
    _run([str(engine), "build", "--model", str(ckpt), "--output", "tiny",
          "--max-batch-tokens", "64"], cwd=work, env=env)
    out = _run([str(engine), "run", "tiny", "-p", "hello", "--max-tokens", "4",
                "--temperature", "0", "--json", "--kv-cache-memory", "4MiB"], cwd=work, env=env)
    assert '"text"' in out.stdout
    probe = _run([str(python), "-c", """
import json, sys
import kernels, transformers.integrations.hub_kernels
import llm_engine, llm_engine.builder.build, llm_engine.runtime.server
print(json.dumps({"kernels": kernels.__file__, "CUDAProperties": hasattr(kernels, "CUDAProperties"),
                  "ours": sorted({m.__file__ for n, m in sys.modules.items()
                                  if n.startswith("llm_engine") and getattr(m, "__file__", None)}),
                  "engine": str(llm_engine.Engine)}))
"""], cwd=work, env=env)
    import json

    info = json.loads(probe.stdout)
    assert info["CUDAProperties"] and not Path(info["kernels"]).is_relative_to(ROOT)
    assert info["ours"] and all(Path(f).is_relative_to(site) for f in info["ours"]), \
        [f for f in info["ours"] if not Path(f).is_relative_to(site)]
    assert info["engine"] == "<class 'llm_engine.runtime.engine.Engine'>"
    templates = Path(site) / "llm_engine" / "templates"
    assert sorted(p.name for p in templates.glob("*.py.j2")) == \
        sorted(p.name for p in (ROOT / "templates").glob("*.py.j2"))
