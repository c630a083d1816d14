"""Import a script from benchmarks/ or examples/ by path. Those folders are not packages, and
the repository root is never on sys.path in the tests (builder/, runtime/ and kernels/ there
would shadow installed packages of those names), so `import benchmarks.soak` cannot work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_script(relpath: str) -> ModuleType:
    path = ROOT / relpath
    name = "script_" + relpath.removesuffix(".py").replace("/", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module
