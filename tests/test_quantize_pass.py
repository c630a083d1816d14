"""`engine build --quant int8-wo`: the graph computes with int8 weights, the quality loss is
measured and recorded, and the rendered GEMM kernels dequantize in the kernel."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from builder.cli import main
from runtime import Engine, SamplingParams
from runtime.evaluate import builtin_text, evaluate
from tests.models import build_tiny_engine


@pytest.fixture(scope="module")
def int8_engine(checkpoints, tmp_path_factory):
    ckpt, _ = checkpoints("llama")
    return build_tiny_engine(ckpt, tmp_path_factory.mktemp("q") / "int8", quant="int8-wo")


def test_linears_use_int8_weights(int8_engine, engines):
    plan = json.loads((int8_engine / "plan.rank0.json").read_text())
    linears = [n for n in plan["nodes"] if n["op"] == "linear"]
    assert linears and all(n["attrs"].get("b_format") == "int8_channel" for n in linears)
    dtypes = {w["dtype"] for name, w in plan["weights"].items() if name.endswith(".int8")}
    assert dtypes == {"int8"}
    gemms = [k for k in plan["kernels"].values() if k["family"] == "gemm"]
    assert gemms and all(k["params"]["b_format"] == "int8_channel" for k in gemms)
    fp32 = json.loads((engines("llama") / "report.json").read_text())["weights"]["bytes"]
    int8 = json.loads((int8_engine / "report.json").read_text())["weights"]["bytes"]
    assert int8 < 0.5 * fp32  # embeddings and norms stay fp32 in this tiny model


def test_report_records_per_layer_error(int8_engine):
    report = json.loads((int8_engine / "report.json").read_text())["quantization"]
    assert report["mode"] == "int8-wo"
    errors = report["weight_rel_error"]
    assert len(errors) == 9  # 2 layers x (qkv, o, gate_up, down) + lm_head
    # Symmetric per-channel int8 on Gaussian-like weights: ~0.5-1% relative Frobenius error.
    assert all(0 < e < 0.02 for e in errors.values())
    assert report["worst"][0][1] == max(errors.values())


def test_quality_close_to_fp32(int8_engine, engines):
    ref = Engine.load(engines("llama"), kv_cache_memory=1 << 20)
    q = Engine.load(int8_engine, kv_cache_memory=1 << 20)
    ids = ref.tokenizer.encode(builtin_text(20_000), add_special_tokens=False)[:512]
    result = evaluate(q, ids, 128, reference=ref)
    base = evaluate(ref, ids, 128)
    assert result.kl < 1e-3 and result.agreement > 0.9
    assert abs(result.perplexity / base.perplexity - 1) < 0.01


def test_exclude_keeps_matching_weights(checkpoints, tmp_path):
    ckpt, _ = checkpoints("llama")
    path = build_tiny_engine(ckpt, tmp_path / "e", quant="int8-wo",
                             quant_exclude=("lm_head*",))
    plan = json.loads((path / "plan.rank0.json").read_text())
    assert "lm_head.weight" in plan["weights"]
    assert "lm_head.weight.int8" not in plan["weights"]
    out = Engine.load(path, kv_cache_memory=1 << 20).generate(
        [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))
    assert len(out[0].token_ids) == 3


def test_unknown_mode_is_one_line_error(checkpoints, tmp_path):
    from builder.build import BuildOptions
    from builder.errors import BuildError

    ckpt, _ = checkpoints("llama")
    with pytest.raises(BuildError, match="--quant 'int3' is not one of"):
        BuildOptions(model=str(ckpt), output=tmp_path / "e", quant="int3")
    result = CliRunner().invoke(main, ["build", "--model", str(ckpt), "--output",
                                       str(tmp_path / "e"), "--quant", "int3"])
    assert result.exit_code != 0 and not (tmp_path / "e").exists()

