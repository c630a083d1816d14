"""DESIGN rule: the runtime never imports the builder or its heavy dependencies, so an engine
can be served from an install without transformers, networkx or onnx."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("builder", "networkx", "onnx", "transformers")


def test_runtime_imports_no_builder_dependencies():
    # A fresh interpreter: this test process has imported all of them already.
    code = f"""
import importlib, pkgutil, sys
import runtime
for mod in pkgutil.walk_packages(runtime.__path__, "runtime."):
    importlib.import_module(mod.name)
bad = sorted({{m.split(".")[0] for m in sys.modules}} & set({FORBIDDEN!r}))
print(",".join(bad))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"runtime pulled in: {out.stdout.strip()}"
