"""benchmarks/ops/: the per-op micro-benchmarks run end to end on tiny sizes (--quick), write a
row per weight format / attention case with positive times, and their two paths (the torch
reference and the ONNX lowering in onnxruntime) agree on the inputs they time, so each
benchmark measures a correct computation. Timings are not checked."""

from __future__ import annotations

import json

import pytest

from llm_engine.kernels import formats
from tests.scripts import load_script

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

# ||ort - torch|| / ||torch|| per format. The fp32 and fp8 lowerings compute what the
# reference does (fp8: the same e4m3 rounding of x), up to summation order. MatMulNBits
# (int8_channel, int4_group) rounds x to int8 per block of K (accuracy level 4), and the W8A8
# lowering quantizes x on a 255-level grid per token where the reference uses 127 levels
# symmetric: those differ by about the activations' quantization error.
TOLERANCE = {"dense": 1e-5, "fp8_channel_a8": 1e-5, "fp8_channel_a8_token": 1e-5,
             "fp8_channel_a8_group": 1e-5, "int8_channel": 2e-2, "int4_group": 2e-2,
             "int8_channel_a8": 3e-2}


def _positive(timing: dict) -> None:
    assert timing["runs"] >= 1
    assert 0 < timing["min_us"] <= timing["median_us"] <= timing["p90_us"]


def test_gemm_benchmark_quick(tmp_path):
    gemm = load_script("benchmarks/ops/gemm.py")
    out = tmp_path / "gemm.json"
    payload = gemm.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    assert set(TOLERANCE) == set(formats.FORMATS)  # a new format needs its tolerance here
    ran = {r["format"] for r in payload["rows"]}
    assert ran | set(payload["skipped"]) == set(formats.FORMATS)
    assert payload["machine"]["threads"] >= 1 and payload["machine"]["cpu"]
    _positive(payload["ort_run_overhead"])
    for row in payload["rows"]:
        assert (row["M"], row["N"], row["K"]) == (1, 576, 576)
        _positive(row["torch"])
        _positive(row["ort"])
        assert row["weight_bytes"] > 0 and row["gbps_ort"] > 0 and row["gflops_torch"] > 0
        assert row["ort_lowering"] and row["ort_ops"]
        assert row["rel_err_ort_vs_torch"] <= TOLERANCE[row["format"]], row
        # and near the unquantized product (int4 g64 on Gaussian weights: ~8%)
        assert row["rel_err_torch_vs_fp32"] < 0.15 and row["rel_err_ort_vs_fp32"] < 0.15, row


def test_attention_benchmark_quick(tmp_path):
    attention = load_script("benchmarks/ops/attention.py")
    out = tmp_path / "attention.json"
    payload = attention.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    cases = {(r["case"], r["batch"], r["context"], r["new"]) for r in payload["rows"]}
    assert cases == {("decode", 2, 40, 1), ("prefill", 1, 24, 24)}
    assert "Attention" in payload["ort_ops"]  # one fused node per layer
    for row in payload["rows"]:
        for path in ("torch", "ort", "meta"):
            _positive(row[path])
        assert row["rel_err_ort_vs_torch"] < 1e-5, row
        assert row["kv_new_max_abs_err"] == 0.0  # the step's K/V handed back unchanged
