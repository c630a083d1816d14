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


def test_step_profile_on_a_tiny_engine(tmp_path, engines):
    """The decode-step profile: onnxruntime's profiler through LLM_ENGINE_ORT_PROFILE, kernel
    time by kind of node, every node of a step accounted for."""
    step_profile = load_script("benchmarks/ops/step_profile.py")
    path = engines("llama")
    out = tmp_path / "profile.json"
    payload = step_profile.main(["--engine", str(path), "--genai", str(tmp_path / "none"),
                                 "--context", "12", "--steps", "6", "--threads", "1",
                                 "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    (row,) = payload["results"]
    # 6 tokens: the prefill makes the first, then 5 decode steps less the first (cold)
    assert row["runs"] == 4
    kinds = row["kernel_ms"]
    assert set(kinds) == set(step_profile.ORDER)
    assert kinds["GEMM"] > 0 and kinds["LM head"] > 0 and kinds["attention"] > 0
    assert row["nodes_per_step"] >= 10 and row["session_ms"] > 0 and row["step_ms"] > 0
    assert 0 <= row["profiler_floor_us"] < 1e4
    # the timed session split by the profile's shares, every kind accounted for
    assert sum(row["session_ms_by_kind"].values()) == pytest.approx(row["session_ms"])
    assert row["profiled_over_timed"] > 0
    assert "| llm-engine float32" in payload["table"]
    assert not list(tmp_path.glob("onnxruntime_profile*"))


def test_step_profile_kinds():
    step_profile = load_script("benchmarks/ops/step_profile.py")

    def node(op, ts, dur, shape=(1, 1, 8)):
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur,
                "args": {"op_name": op, "output_type_shape": [{"float": list(shape)}]}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
              node("MatMul", 1, 50),  # the prefill run, skipped
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
              node("MatMulNBits", 201, 30), node("MatMulNBits", 240, 20, (1, 1, 32)),
              node("GroupQueryAttention", 260, 12), node("Gather", 280, 6)]
    res = step_profile.summarize(events, skip=1, vocab=32)
    assert res["runs"] == 1 and res["nodes_per_step"] == 4
    floor = res["profiler_floor_us"]
    assert floor == 6  # the shortest kernel: the profiler's own cost in each
    assert res["kernel_ms"]["GEMM"] == pytest.approx((30 - floor) / 1e3)
    assert res["kernel_ms"]["LM head"] == pytest.approx((20 - floor) / 1e3)
    assert res["kernel_ms"]["attention"] == pytest.approx((12 - floor) / 1e3)
    assert res["kernel_ms"]["layout"] == 0


def test_moe_benchmark_quick(tmp_path):
    """Both ONNX lowerings of `moe` (dense, onnxruntime's MoE op) from the exporter itself
    compute what the reference computes."""
    moe = load_script("benchmarks/ops/moe.py")
    out = tmp_path / "moe.json"
    payload = moe.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == payload
    assert [r["tokens"] for r in payload["rows"]] == [1, 5]
    for row in payload["rows"]:
        for path in ("torch", "ort_dense", "ort_contrib"):
            _positive(row[path])
        assert row["rel_err_dense"] < 1e-5 and row["rel_err_contrib"] < 1e-5, row
