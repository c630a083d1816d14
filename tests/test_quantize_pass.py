"""`engine build --quant MODE [--kv-cache-dtype D]` on tiny models: each mode builds, generates,
records its quality, and keeps quality close to the unquantized engine; the build gates and
every bad input fail before work with one line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from llm_engine.builder.build import BuildOptions
from llm_engine.builder.cli import main
from llm_engine.builder.errors import BuildError
from llm_engine.runtime import Engine, SamplingParams
from llm_engine.runtime.evaluate import builtin_text, evaluate
from tests.cli_util import one_line_error
from tests.models import build_tiny_engine

# Small calibration so a tiny build stays around a second; the defaults are 8 x 512.
FAST = {"calib_samples": 4, "calib_seq_len": 128, "calib_cache": None}
MODES = ["int8-wo", "int8-sq", "fp8", "int4-awq", "int4-gptq"]
FORMATS = {"int8-wo": "int8_channel", "int8-sq": "int8_channel_a8", "fp8": "fp8_channel_a8",
           "int4-awq": "int4_group", "int4-gptq": "int4_group",
           "fp8-per-token": "fp8_channel_a8_token", "fp8-group": "fp8_channel_a8_group"}
# Build variants tested like modes: case -> (mode, build options).
VARIANTS = {"fp8-per-token": ("fp8", {"fp8_act_scales": "per-token"}),
            "fp8-group": ("fp8", {"fp8_act_scales": "per-token-group", "group_size": 32,
                                  "arch": "llama_wide"})}
CASES = [*MODES, *VARIANTS]


def _case(quant_engines, case: str):
    mode, options = VARIANTS.get(case, (case, {}))
    return mode, quant_engines(mode, **options)


def _arch(case: str) -> str:
    return VARIANTS.get(case, (case, {}))[1].get("arch", "llama")


def _plan(path):
    return json.loads((path / "plan.rank0.json").read_text())


def _quant_report(path):
    return json.loads((path / "report.json").read_text())["quantization"]


def _ids_file(path, vocab=320, lines=8, length=200):
    gen = torch.Generator().manual_seed(0)
    path.write_text("\n".join(json.dumps({"input_ids": torch.randint(0, vocab, (length,),
                                                                     generator=gen).tolist()})
                              for _ in range(lines)))
    return path


@pytest.fixture(scope="module")
def quant_engines(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    ids = _ids_file(root / "ids.jsonl")  # for the archs that ship no tokenizer
    cache: dict = {}

    def get(mode: str, arch: str = "llama", **options):
        key = (mode, arch, tuple(sorted(options.items())))
        if key not in cache:
            ckpt, _ = checkpoints(arch)
            extra = {} if arch in ("llama", "qwen2") else {"calib_data": ids}
            cache[key] = build_tiny_engine(ckpt, root / f"{arch}-{mode}-{len(cache)}",
                                           quant=mode, **{**FAST, **extra, **options})
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES)
def test_mode_builds_and_generates(case, quant_engines, engines):
    mode, path = _case(quant_engines, case)
    plan = _plan(path)
    linears = [n for n in plan["nodes"] if n["op"] == "linear"]
    # Every decoder GEMM takes the mode's format; the LM head is the int8 per-row table.
    # (int8-sq rotates by default: its block Hadamard GEMMs before down stay fp32.)
    body = [n for n in linears if not any("lm_head" in o for o in n["origin"])
            and not n["inputs"][1].startswith("rotation_")]
    assert body and all(n["attrs"]["b_format"] == FORMATS[case] for n in body)
    if FORMATS[case] == "fp8_channel_a8_group":  # --group-size 32 divides every width
        assert all(n["attrs"]["group_size"] == 32 for n in body)
        assert all(e.get("group_size") == 32 for e in _quant_report(path)["layers"].values()
                   if e["format"] == "fp8_channel_a8_group")
    head = [n for n in linears if any("lm_head" in o for o in n["origin"])]
    assert [n["attrs"]["b_format"] for n in head] == ["int8_channel"]
    report = _quant_report(path)
    # 2 layers x (qkv, o, gate_up, down) + lm_head + the (untied) embedding table
    assert report["mode"] == mode and len(report["weight_rel_error"]) == 10
    q = report["quality"]
    assert q["tokens"] > 100 and q["window"] == 128
    assert {"ppl_ref", "ppl_quant", "ppl_increase_pct", "kl", "greedy_agreement"} <= set(q)
    layer = report["layers"]["model.layers.0.mlp.down_proj.weight"]
    assert {"weight_rel_error", "output_rel_error", "act_absmax", "weight_scale"} <= set(layer)
    ref = Engine.load(engines(_arch(case)), kv_cache_memory=1 << 20)
    eng = Engine.load(path, kv_cache_memory=1 << 20)
    params = SamplingParams(temperature=0, max_tokens=8)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10]]
    got = [o.token_ids for o in eng.generate(prompts, params)]
    want = [o.token_ids for o in ref.generate(prompts, params)]
    assert all(len(g) == 8 for g in got)
    if mode in ("int8-wo", "int8-sq"):  # the random model's top-2 margins are tiny: first token
        assert [g[:1] for g in got] == [w[:1] for w in want]


# Perplexity increase allowed per mode on the tiny llama (fp32 reference, 512 held-out tokens).
# The int4 bounds sit well under plain round-to-nearest's, measured on the same model below.
PPL_BOUND = {"int8-wo": 0.5, "int8-sq": 1.0, "fp8": 3.0, "int4-awq": 10.0, "int4-gptq": 10.0,
             "fp8-per-token": 3.0, "fp8-group": 3.0}


@pytest.mark.parametrize("case", CASES)
def test_perplexity_close_to_fp32(case, quant_engines, engines):
    ref = Engine.load(engines(_arch(case)), kv_cache_memory=1 << 20)
    q = Engine.load(_case(quant_engines, case)[1], kv_cache_memory=1 << 20)
    ids = ref.tokenizer.encode(builtin_text(20_000), add_special_tokens=False)[:512]
    base = evaluate(ref, ids, 128)
    result = evaluate(q, ids, 128, reference=ref)
    increase = 100 * (result.perplexity / base.perplexity - 1)
    assert increase < PPL_BOUND[case], (case, increase)
    assert result.agreement > 0.8


def test_int4_algorithms_beat_round_to_nearest(quant_engines):
    """AWQ and GPTQ must do better than plain RTN on the layers' calibration outputs: a mode
    that silently fell back to RTN fails here."""
    for mode in ("int4-awq", "int4-gptq"):
        report = _quant_report(quant_engines(mode))
        int4 = [e for e in report["layers"].values() if e["format"] == "int4_group"]
        better = sum(e["output_rel_error"] < e["rtn_output_rel_error"] for e in int4)
        assert better >= 6, (mode, better)  # of 8 decoder GEMMs


@pytest.mark.parametrize("mode", ["int4-awq", "int4-gptq"])
def test_int4_integer_zero_points(mode, quant_engines):
    """--int4-zero-point integer stores uint8 integer zero points (the older format, whose ONNX
    lowering needs no offsets GEMM), and the default real-valued ones do better on the layers'
    calibration outputs."""
    path = quant_engines(mode, int4_zero_point="integer", group_size=16)
    plan, report = _plan(path), json.loads((path / "report.json").read_text())
    zeros = [w for name, w in plan["weights"].items() if name.endswith(".zeros")]
    assert zeros and all(w["dtype"] == "uint8" for w in zeros)
    assert report["quantization"]["int4_zero_point"] == "integer"
    lowered = report["onnx"]["lowerings"]
    assert lowered["MatMulNBits 4-bit g16"] == 2 and not any("offsets" in k for k in lowered)
    floats = quant_engines(mode, group_size=16)
    assert {w["dtype"] for name, w in _plan(floats)["weights"].items()
            if name.endswith(".zeros")} == {"float32"}
    lowered = json.loads((floats / "report.json").read_text())["onnx"]["lowerings"]
    assert lowered["MatMulNBits 4-bit g16 + zero-point offsets"] == 2  # the down projections

    def mean_error(engine):
        layers = _quant_report(engine)["layers"].values()
        return sum(e["output_rel_error"] for e in layers if e["format"] == "int4_group")

    assert mean_error(floats) < mean_error(path)
    out = Engine.load(path, kv_cache_memory=1 << 20).generate(
        [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].token_ids) == 4


def test_tied_embedding_shares_one_int8_table(quant_engines):
    path = quant_engines("int4-gptq", arch="llama_tied")
    plan = _plan(path)
    emb = next(n for n in plan["nodes"] if n["op"] == "embedding")
    head = next(n for n in plan["nodes"] if n["op"] == "linear"
                and any("lm_head" in o for o in n["origin"]))
    assert emb["attrs"]["b_format"] == "int8_channel"
    assert emb["inputs"][0] == head["inputs"][1] and emb["inputs"][2] == head["inputs"][2]
    table = next(n for n in plan["nodes"] if n["name"] == emb["inputs"][0])["attrs"]["name"]
    assert plan["weights"][table]["dtype"] == "int8"
    out = Engine.load(path, kv_cache_memory=1 << 20).generate(
        [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].token_ids) == 4


def test_smoothing_is_folded_into_the_norms(quant_engines, engines):
    """int8-sq moves 1/s into the RMSNorm weights (and the up rows before down, the V rows
    before o_proj) instead of adding ops: the graph has as many nodes as the int8-wo one."""
    sq, wo = _plan(quant_engines("int8-sq", rotation="none")), _plan(quant_engines("int8-wo"))
    assert len(sq["nodes"]) == len(wo["nodes"])
    layers = _quant_report(quant_engines("int8-sq", rotation="none"))["layers"]
    smoothed = [n for n, e in layers.items() if "smoothing" in e]
    assert any("q_proj" in n for n in smoothed) and any("down_proj" in n for n in smoothed)
    # o_proj's input is attention's output: its scale goes into the V rows, tied over the
    # query heads of each KV head (tests/test_quant_folds.py checks the fold is exact).
    assert any("o_proj" in n for n in smoothed)


def test_int8_sq_rotates_by_default(quant_engines):
    """--rotation auto rotates int8-sq online: the residual stream and heads in the weights
    (no ops), a reshape / block Hadamard GEMM / reshape before each down projection, whose
    input is then no longer smoothed; the others still are."""
    rotated, plain = quant_engines("int8-sq"), quant_engines("int8-sq", rotation="none")
    report = _quant_report(rotated)
    assert report["rotation"]["kind"] == "online" and report["rotation"]["mlp"] == 2
    assert report["rotation"]["residual"]["matrix"] in ("hadamard", "random")
    # 3 ops per layer and the one Hadamard matrix they share
    assert len(_plan(rotated)["nodes"]) == len(_plan(plain)["nodes"]) + 3 * 2 + 1
    smoothed = [n for n, e in report["layers"].items() if "smoothing" in e]
    assert any("q_proj" in n for n in smoothed) and any("o_proj" in n for n in smoothed)
    assert not any("down_proj" in n for n in smoothed)
    assert _quant_report(quant_engines("int8-wo"))["rotation"]["kind"] == "none"


def test_rotation_plot(quant_engines, tmp_path):
    from tests.scripts import load_script

    plot = load_script("benchmarks/rotation_plot.py").main

    out = tmp_path / "outliers.png"
    assert plot(["--engine", f"none={quant_engines('int8-sq', rotation='none')}",
                 "--engine", f"online={quant_engines('int8-sq')}", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("quant, rotation, tp, want", [
    ("int8-sq", "auto", 1, "online"), ("int8-wo", "auto", 1, "none"),
    ("int4-gptq", "online", 1, "online"), ("int8-sq", "auto", 2, "offline"),
    ("fp8", "offline", 2, "offline")])
def test_rotation_choice(quant, rotation, tp, want):
    from llm_engine.builder.quant.config import QuantConfig

    assert QuantConfig(mode=quant, rotation=rotation, tp=tp).applied_rotation == want


def test_kv_cache_int8(quant_engines, engines):
    path = quant_engines("int8-wo", kv_cache_dtype="int8")
    plan = _plan(path)
    assert {layer["dtype"] for layer in plan["kv_cache"]["layers"]} == {"int8"}
    attn = [n for n in plan["nodes"] if n["op"] == "paged_attention"]
    assert all(len(n["attrs"]["k_scale"]) == n["attrs"]["num_kv_heads"] for n in attn)
    report = _quant_report(path)
    assert report["kv_cache"]["dtype"] == "int8"
    assert report["quality"]["greedy_agreement"] > 0.9
    out = Engine.load(path, kv_cache_memory=1 << 20).generate(
        [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].token_ids) == 4


def test_kv_cache_only(quant_engines):
    path = quant_engines(None, kv_cache_dtype="fp8")
    plan = _plan(path)
    assert {layer["dtype"] for layer in plan["kv_cache"]["layers"]} == {"float8_e4m3fn"}
    assert all(n["attrs"].get("b_format", "dense") == "dense"
               for n in plan["nodes"] if n["op"] == "linear")


def test_exclude_keeps_matching_weights(quant_engines):
    path = quant_engines("int8-wo", quant_exclude=("lm_head*", "*down_proj*"))
    plan = _plan(path)
    assert "lm_head.weight" in plan["weights"] and "lm_head.weight.int8" not in plan["weights"]
    downs = [n for n in plan["nodes"] if n["op"] == "linear"
             and any("down_proj" in o for o in n["origin"])]
    assert downs and all(n["attrs"].get("b_format", "dense") == "dense" for n in downs)
    assert _quant_report(path)["excluded"] == 3  # lm_head and two down projections


def test_exclude_by_module_name_on_a_tied_head(quant_engines):
    """`--quant-exclude lm_head` names the HF module; on a tied model the head is the
    embedding table, which then stays in full precision for both of its users."""
    path = quant_engines("int8-wo", arch="llama_tied",
                         quant_exclude=("lm_head", "model.layers.1.mlp"))
    plan = _plan(path)
    emb = next(n for n in plan["nodes"] if n["op"] == "embedding")
    assert emb["attrs"].get("b_format", "dense") == "dense"
    table = next(n for n in plan["nodes"] if n["name"] == emb["inputs"][0])["attrs"]["name"]
    assert plan["weights"][table]["dtype"] == "float32"
    mlp1 = [n for n in plan["nodes"] if n["op"] == "linear"
            and any(o.endswith("@model.layers.1.mlp.down_proj") for o in n["origin"])]
    assert mlp1 and all(n["attrs"].get("b_format", "dense") == "dense" for n in mlp1)
    # the table, layer 1's gate/up and down
    assert _quant_report(path)["excluded"] == 3


def test_exclude_that_matches_nothing_fails_before_calibrating(monkeypatch, checkpoints,
                                                               tmp_path):
    import llm_engine.builder.passes.quantize as quantize

    monkeypatch.setattr(quantize, "load_calib_data",
                        lambda *a, **k: pytest.fail("calibration started"))
    ckpt, _ = checkpoints("llama")
    with pytest.raises(BuildError, match="--quant-exclude 'lm_hed' matches no quantized weight"):
        build_tiny_engine(ckpt, tmp_path / "e", quant="int8-wo", quant_exclude=("lm_hed",),
                          **FAST)


def test_calibration_cache_and_jsonl_ids(checkpoints, tmp_path):
    ckpt, _ = checkpoints("llama")
    data = _ids_file(tmp_path / "calib.jsonl")
    opts = {**FAST, "calib_cache": tmp_path / "cache", "calib_data": data}
    first = build_tiny_engine(ckpt, tmp_path / "a", quant="int8-sq", rotation="none", **opts)
    second = build_tiny_engine(ckpt, tmp_path / "b", quant="fp8", **opts)
    a, b = _quant_report(first)["calibration"], _quant_report(second)["calibration"]
    assert not a["cached"] and b["cached"] and a["tokens"] == b["tokens"] == 4 * 128
    # A rotated model has other activations: its statistics are not the cached ones.
    third = build_tiny_engine(ckpt, tmp_path / "c", quant="int8-sq", **opts)
    assert not _quant_report(third)["calibration"]["cached"]
    assert a["source"] == str(data)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # unrotated, rotated


def test_accuracy_gate_fails_build_with_report(checkpoints, tmp_path):
    ckpt, _ = checkpoints("llama")
    out = tmp_path / "e"
    result = CliRunner().invoke(main, [
        "build", "--model", str(ckpt), "--output", str(out), "--quant", "fp8",
        "--calib-samples", "4", "--calib-seq-len", "128", "--max-batch-tokens", "64",
        "--min-greedy-agreement", "0.999"])
    # The build had started (its progress lines come first); the failure is the last line.
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: quantized engine fails the accuracy gate: greedy agreement")
    assert "largest output error: model.layers." in last
    assert not out.exists()
    report = json.loads((tmp_path / "e.quant-report.json").read_text())
    assert report["gates"]["failed"] and report["worst"]


def test_accuracy_gate_passes(quant_engines):
    report = _quant_report(quant_engines("int8-wo", max_ppl_increase=2.0))
    assert report["gates"]["failed"] == [] and report["gates"]["max_ppl_increase"] == 2.0


@pytest.mark.parametrize("args, fragments", [
    (["--quant", "int3"], ["--quant 'int3' is not one of"]),
    (["--quant", "int4-awq", "--group-size", "4"], ["--group-size 4", "at least 8"]),
    (["--kv-cache-dtype", "int2"], ["--kv-cache-dtype 'int2'"]),
    (["--quant", "int8-sq", "--smoothquant-alpha", "1.5"], ["outside [0, 1]"]),
    (["--max-ppl-increase", "1"], ["need --quant"]),
    (["--quant", "int8-wo", "--calib-data", "missing.txt"], ["no such file"]),
    (["--quant", "int8-sq", "--rotation", "spin"], ["--rotation 'spin' is not one of"]),
    (["--rotation", "online"], ["--rotation online needs --quant"]),
    (["--quant", "fp8", "--fp8-act-scales", "token"], ["--fp8-act-scales 'token' is not one of"]),
    (["--quant", "int8-sq", "--fp8-act-scales", "per-token"], ["needs --quant fp8"]),
    (["--quant-exclude", "lm_head"], ["--quant-exclude needs --quant"]),
    (["--quant", "int8-wo", "--group-size", "64"], ["--quant int8-wo has none"]),
    (["--group-size", "64"], ["a build without --quant has none"]),
    (["--quant", "fp8", "--fp8-act-scales", "per-token-group", "--group-size", "48"],
     ["--group-size 48: fp8 activation groups are powers of two >= 32"]),
    (["--quant", "fp8", "--fp8-act-scales", "per-token-group", "--group-size", "16"],
     ["powers of two >= 32"]),
    (["--quant", "int4-awq", "--int4-zero-point", "half"],
     ["--int4-zero-point 'half' is not one of"]),
    (["--quant", "int8-wo", "--int4-zero-point", "integer"],
     ["--int4-zero-point integer needs --quant int4-awq or int4-gptq"]),
])
def test_bad_options_are_one_line_errors(args, fragments, checkpoints, tmp_path):
    ckpt, _ = checkpoints("llama")
    result = CliRunner().invoke(main, ["build", "--model", str(ckpt), "--output",
                                       str(tmp_path / "e"), *args])
    one_line_error(result, *fragments)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("content, fragment", [
    ("", "is empty"),
    ("   \n", "is empty"),
    (b"\xff\xfe\x00bad", "cannot read"),
    ('{"foo": 1}\n', "each JSONL line needs"),
])
def test_bad_calibration_file(content, fragment, checkpoints, tmp_path):
    ckpt, _ = checkpoints("llama")
    suffix = ".jsonl" if "foo" in str(content) else ".txt"
    data = tmp_path / f"calib{suffix}"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(BuildError, match=fragment):
        build_tiny_engine(ckpt, tmp_path / "e", quant="int8-wo", calib_data=data, **{
            k: v for k, v in FAST.items() if k != "calib_data"})
    assert not (tmp_path / "e").exists()


def test_fp8_without_float8_support(monkeypatch, tmp_path):
    import llm_engine.builder.quant.config as config

    monkeypatch.setattr(config, "has_fp8", lambda: False)
    with pytest.raises(BuildError, match=r"fp8 needs torch\.float8_e4m3fn"):
        BuildOptions(model="x", output=tmp_path / "e", quant="fp8")


@pytest.mark.parametrize("K, requested, want", [
    (576, 128, 64), (1536, 128, 128), (96, 128, 32), (192, 100, 64), (128, 64, 64),
    (72, 128, None), (160, 16, None), (4096, 256, 256),
])
def test_fp8_group_fallback(K, requested, want):
    from llm_engine.builder.quant.config import fp8_group_for

    assert fp8_group_for(K, requested) == want


def test_fp8_groups_need_a_power_of_two_width(monkeypatch, checkpoints, tmp_path):
    """The tiny llama's widths (72, 160) have no power-of-two group >= 32 dividing 72."""
    import llm_engine.builder.passes.quantize as quantize

    monkeypatch.setattr(quantize, "load_calib_data",
                        lambda *a, **k: pytest.fail("calibration started"))
    ckpt, _ = checkpoints("llama")
    with pytest.raises(BuildError, match=r"per-token-group: model\.layers\.0\..* has 72 input "
                       "channels, which no power-of-two group of 32 to 128 divides"):
        build_tiny_engine(ckpt, tmp_path / "e", quant="fp8", fp8_act_scales="per-token-group",
                          **FAST)


def test_group_size_that_divides_nothing(monkeypatch, checkpoints, tmp_path):
    """A group size >= 8 with no usable divisor in some layer (tiny K) fails before calibrating."""
    import llm_engine.builder.passes.quantize as quantize

    monkeypatch.setattr(quantize, "load_calib_data",
                        lambda *a, **k: pytest.fail("calibration started"))
    ckpt, _ = checkpoints("llama")
    with pytest.raises(BuildError, match="--group-size 100 divides none"):
        build_tiny_engine(ckpt, tmp_path / "e", quant="int4-gptq", group_size=100, **FAST)
