"""Engines built from tiny random models of every supported architecture compute the same
function as HF transformers: logits within 1e-4 (fp32) on a mixed prefill/decode batch, and
greedy decoding token-identical to `generate`, through the plan's reference executor and
through the engine's ONNX graph (the CPU fast path)."""

from __future__ import annotations

import pytest
import torch

from tests.harness import PagedRunner
from tests.models import ARCHS, HUB_ARCHS, architecture_table

# fp32 logits of these models are O(1-10); 1e-4 absolute leaves room only for reassociation.
FP32_ATOL = 1e-4


def _hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize("backend", ["reference", "onnx"])
@pytest.mark.parametrize("arch", ARCHS + HUB_ARCHS)
def test_mixed_batch_logits_match_hf(arch, backend, checkpoints, engines):
    _, hf = checkpoints(arch)
    runner = PagedRunner(engines(arch), backend=backend)
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(0, 320, (n,), generator=g).tolist() for n in (9, 11, 6))
    # step 1: two prefills; step 2: a decodes, b continues its prompt, c starts
    first = runner.step([(0, a[:8]), (1, b[:5])], all_rows=True)
    second = runner.step([(0, a[8:]), (1, b[5:]), (2, c)], all_rows=True)
    ref_a, ref_b, ref_c = _hf_logits(hf, a), _hf_logits(hf, b), _hf_logits(hf, c)
    torch.testing.assert_close(first[0], ref_a[:8], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(first[1], ref_b[:5], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(second[0], ref_a[8:], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(second[1], ref_b[5:], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(second[2], ref_c, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "onnx"])
@pytest.mark.parametrize("arch", ARCHS + HUB_ARCHS)
def test_greedy_matches_hf_generate(arch, backend, checkpoints, engines):
    _, hf = checkpoints(arch)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (3, 12, 7, 1)]
    ours = PagedRunner(engines(arch), backend=backend).greedy(prompts, max_new=32)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


def test_readme_lists_the_tested_architectures():
    """README's supported-architectures table is the one these tests back (regenerate it
    with `python -c "from tests.models import architecture_table as t; print(t())"`)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start, end = "<!-- architectures:start -->\n", "<!-- architectures:end -->"
    assert start in readme and end in readme
    table = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == architecture_table()
