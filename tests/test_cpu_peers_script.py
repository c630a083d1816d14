"""benchmarks/cpu_peers.py: the ratio arithmetic and the skip of a missing peer (no model)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_peers.py"


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("cpu_peers_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def test_ratios_and_missing_peer_skip(monkeypatch):
    m = load_script(monkeypatch)
    R = m.Result
    results = [
        R("llama.cpp", "Q4_1", batch1_tok_s=100.0),
        R("llm-engine", "int4", batch1_tok_s=150.0),
        R("llm-engine", "int8", batch1_tok_s=50.0, concurrent_tok_s=800.0),
        R("llm-engine", "bf16", batch1_tok_s=30.0, concurrent_tok_s=300.0),
        R("HF transformers", "fp32", batch1_tok_s=20.0, concurrent_tok_s=400.0),
        R("HF transformers", "bf16", skipped="not installed: pip install transformers"),
    ]
    r = m.ratios(results)
    assert r["int4 / llama.cpp, batch-1 tok/s"] == 1.5
    assert r["int8 / llama.cpp, batch-1 tok/s"] == 0.5
    assert r["int8 concurrent / HF fp32 batch, tok/s"] == 2.0
    assert r["fp32 / HF fp32, batch-1 tok/s"] is None  # no llm-engine fp32 in this run
    assert r["bf16 / HF bf16, batch-1 tok/s"] is None  # HF bf16 skipped: no number, no ratio
    assert r["bf16 concurrent / HF bf16 batch, tok/s"] is None
    assert set(r) == {key for key, *_ in m.RATIO_SPECS}

    # A missing peer package is a skip entry with the install command, not an exception.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    res = m.guarded("llama.cpp", "Q4_1", lambda: m.run_llamacpp(m.Settings(threads=1)))
    assert res.skipped == "not installed: pip install llama-cpp-python"
    assert res.batch1_tok_s is None
    assert m.ratios([*results[1:], res])["int4 / llama.cpp, batch-1 tok/s"] is None
