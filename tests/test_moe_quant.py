"""Quantized experts (int8 per channel, int4 groups): the `moe` reference over stored parts,
its ONNX lowerings (QMoE, and the dequantized dense / gather forms), and a quantized MoE
build end to end."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from llm_engine.kernels import formats
from llm_engine.kernels.ops import OPS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "ops"))

E, K_TOP, H, INTER = 4, 2, 64, 32


def _routing(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    probs = torch.randn(tokens, E, generator=g).softmax(-1)
    index = probs.topk(K_TOP).indices
    return x, index, probs.gather(-1, index)


def _experts(bias: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"gate_up": torch.randn(E, 2 * INTER, H, generator=g) * H ** -0.5,
         "down": torch.randn(E, H, INTER, generator=g) * INTER ** -0.5}
    if bias:
        w |= {"gate_up_bias": torch.randn(E, 2 * INTER, generator=g) * 0.1,
              "down_bias": torch.randn(E, H, generator=g) * 0.1}
    return w


def _quantized(dense: dict, fmt: str, act: str, group: int = 16) -> tuple[dict, dict]:
    from moe import quantized

    weights, attrs = quantized({k: dense[k] for k in ("gate_up", "down")}, fmt, group)
    weights |= {k: v for k, v in dense.items() if "bias" in k}
    attrs["act"] = act
    if act == "clamped_swiglu":
        attrs |= {"alpha": 1.702, "limit": 0.5}
    return weights, attrs


@pytest.mark.parametrize("fmt", ["int8_channel", "int4_group"])
def test_reference_over_stored_parts_is_the_dequantized_moe(fmt):
    """ops.moe on an expert format's parts = the float moe on the dequantized experts."""
    dense = _experts(bias=True)
    weights, attrs = _quantized(dense, fmt, "silu")
    x, index, w = _routing(9, 1)
    got = OPS["moe"].fn(x, index, w, *weights.values(), **attrs)
    fmt_ = formats.get(fmt)
    n = fmt_.operands
    parts = list(weights.values())
    deq = [torch.stack([fmt_.dequantize(*(p[e] for p in parts[i * n:(i + 1) * n]),
                                        group_size=attrs.get("group_size")) for e in range(E)])
           for i in (0, 1)]
    want = OPS["moe"].fn(x, index, w, *deq, dense["gate_up_bias"], dense["down_bias"],
                         act="silu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_refuses_a_wrong_operand_count():
    weights, attrs = _quantized(_experts(bias=False), "int4_group", "silu")
    x, index, w = _routing(3, 2)
    with pytest.raises(ValueError, match="weight operands for format int4_group"):
        OPS["moe"].fn(x, index, w, *list(weights.values())[:5], **attrs)


@pytest.mark.parametrize("lowering", ["auto", "dense", "gather"])
@pytest.mark.parametrize("fmt", ["dense", "int8_channel", "int4_group"])
@pytest.mark.parametrize(("act", "bias"), [("silu", False), ("clamped_swiglu", True),
                                           ("gelu_tanh", True)])
def test_onnx_lowerings_match_the_reference(lowering, fmt, act, bias, tmp_path):
    """Every lowering of `moe` against the reference on the same stored weights, fp32: QMoE
    (quantized SwiGLU experts), MoE (float SwiGLU), the dense form and the gather-per-expert
    form (dequantized experts folded at load). Tolerance 1e-5 relative: all compute in fp32
    from the same dequantized values."""
    from common import ort_session
    from moe import export_moe

    dense = _experts(bias)
    if fmt == "dense":
        weights = dict(dense)
        attrs = {"act": act, **({"alpha": 1.702, "limit": 0.5}
                                if act == "clamped_swiglu" else {})}
    else:
        weights, attrs = _quantized(dense, fmt, act)
    sess = ort_session(export_moe(lowering, K_TOP, H, tmp_path, weights, attrs), 1)
    for tokens in (1, 7):
        x, index, w = _routing(tokens, tokens)
        got = torch.from_numpy(sess.run(None, {"x": x.numpy(), "index": index.numpy(),
                                               "w": w.numpy()})[0])
        want = OPS["moe"].fn(x, index, w, *weights.values(), **attrs)
        err = float((got - want).norm() / want.norm())
        assert err < 1e-5, (lowering, fmt, act, tokens, err)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> str:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("calib") / "ids.jsonl"
    path.write_text("".join(json.dumps({"input_ids": [rng.randrange(320) for _ in range(64)]})
                            + "\n" for _ in range(6)))
    return str(path)


@pytest.mark.parametrize(("arch", "quant", "fmt"), [("mixtral", "int4-awq", "int4_group"),
                                                    ("gpt_oss", "int8-wo", "int8_channel")])
def test_quantized_moe_engine(arch, quant, fmt, checkpoints, calib_file, tmp_path):
    """A MoE build under --quant stores its experts quantized (from each expert's own
    calibration rows; experts no token reached are rounded to nearest and counted), lowers
    them to QMoE on the fast path, and both backends generate the same greedy tokens."""
    from tests.harness import PagedRunner
    from tests.models import build_tiny_engine

    ckpt, _ = checkpoints(arch)
    path = build_tiny_engine(ckpt, tmp_path / "engine", quant=quant, calib_data=calib_file,
                             calib_samples=4, calib_seq_len=64, calib_cache=None)
    report = json.loads((path / "report.json").read_text())
    experts = report["quantization"]["experts"]
    assert experts and all(layer["format"] == fmt for layer in experts.values())
    tokens = report["quantization"]["calibration"]["tokens"]
    for layer in experts.values():
        rows = layer["calibration_rows"]
        assert len(rows) == layer["experts"] and sum(rows) == 2 * tokens  # top-2
        assert layer["experts_without_calibration"] == rows.count(0)
        assert layer["output_rel_error"]["max"] < (0.15 if "int4" in fmt else 0.01)
    plan = json.loads((path / "plan.rank0.json").read_text())
    moe = [n for n in plan["nodes"] if n["op"] == "moe"]
    assert moe and all(n["attrs"]["w_format"] == fmt for n in moe)
    assert report["onnx"]["written"] and report["onnx"]["lowerings"]["moe_qmoe"] == len(moe)
    prompts = [[5, 17, 42, 99, 3, 250, 7, 64, 12], [300, 2, 8]]
    ref = PagedRunner(path, backend="reference").greedy(prompts, max_new=12)
    fast = PagedRunner(path, backend="onnx").greedy(prompts, max_new=12)
    assert ref == fast


def test_quantized_experts_under_tp_stay_whole_and_ranks_match(checkpoints, calib_file,
                                                                tmp_path):
    """--tp with quantized experts: every rank keeps all of every expert (the split of the
    other GEMMs takes whole rows), so the ranks' logits are the single-rank engine's."""
    from tests.harness import PagedRunner
    from tests.models import build_tiny_engine
    from tests.test_partition import _rank_logits, _steps

    ckpt, _ = checkpoints("mixtral")
    opts = dict(quant="int8-wo", calib_data=calib_file, calib_samples=2, calib_seq_len=64,
                calib_cache=None)
    one = PagedRunner(build_tiny_engine(ckpt, tmp_path / "tp1", **opts))
    path = build_tiny_engine(ckpt, tmp_path / "tp2", tp=2, **opts)
    plan = json.loads((path / "plan.rank1.json").read_text())
    moe = [n for n in plan["nodes"] if n["op"] == "moe"]
    assert moe and all(n["attrs"]["w_format"] == "int8_channel" for n in moe)
    shapes = {n["name"]: n["shape"] for n in plan["nodes"]}
    inter = json.loads((ckpt / "config.json").read_text())["intermediate_size"]
    assert all(shapes[n["inputs"][3]][1] == 2 * inter for n in moe)
    want = [one.step(work) for work in _steps()]
    for rank_steps in _rank_logits(path, 2, _steps()):
        for w, g in zip(want, rank_steps, strict=True):
            for sid in w:
                torch.testing.assert_close(g[sid], w[sid], rtol=1e-4, atol=1e-4)
