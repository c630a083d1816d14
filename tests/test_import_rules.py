"""DESIGN rule: the runtime never imports the builder or its heavy dependencies, so an engine
can be served from an install without transformers, networkx or onnx."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("llm_engine.builder", "networkx", "onnx", "transformers")


def test_runtime_imports_no_builder_dependencies():
    # A fresh interpreter: this test process has imported all of them already.
    code = f"""
import importlib, pkgutil, sys
import llm_engine.runtime as runtime
for mod in pkgutil.walk_packages(runtime.__path__, "llm_engine.runtime."):
    importlib.import_module(mod.name)
bad = sorted(f for f in {FORBIDDEN!r}
             if any(m == f or m.startswith(f + ".") for m in sys.modules))
print(",".join(bad))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"runtime pulled in: {out.stdout.strip()}"
