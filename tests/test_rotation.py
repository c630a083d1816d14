"""The rotation pass (`--rotation`) leaves the model's logits unchanged: the residual stream,
V/o_proj per head and the online block Hadamard before down are each exact, on every tiny
architecture that has the shape each needs; and the orthogonal matrices are orthogonal."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_engine.builder.passes.quantize import QuantEnv
from llm_engine.builder.quant import calibrate as cal
from llm_engine.builder.quant.folds import Weights as _Weights
from llm_engine.builder.quant.hadamard import hadamard_pm1, rotation_matrix
from llm_engine.builder.quant.rotate import find_stream, is_rotation_linear, rotate


# Hidden sizes of real models (SmolLM2 576, Llama 4096, Mistral 14336 intermediate, ...).
@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 72, 144, 576, 1536, 3072, 11008])
def test_hadamard_orders(n):
    h = hadamard_pm1(n)
    assert h is not None and torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.integers(0, 5))
def test_rotation_matrix_is_orthogonal(n, seed):
    q, kind = rotation_matrix(n, seed)
    assert kind in ("hadamard", "random")
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    if kind == "hadamard":  # every entry the same magnitude: no channel keeps its outlier
        assert torch.allclose(q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


def test_no_hadamard_for_odd_orders():
    assert hadamard_pm1(9) is None and rotation_matrix(9)[1] == "random"


def _rotated(graph0, weights, kind: str):
    graph = copy.deepcopy(graph0)
    env = QuantEnv(source=None, buffers={}, tokenizer=None, vocab_size=320, max_seq_len=512)
    w = _Weights(graph, env, dict(weights))
    return graph, w, rotate(graph, w, kind)


# (arch, residual rotated?, attention blocks rotated, mlp blocks rotated)
ARCHS = [("llama", True, 2, 2), ("llama_tied", True, 2, 2), ("qwen2", True, 2, 2),
         ("mistral", True, 2, 2), ("gpt2", False, 2, 0)]


@pytest.mark.parametrize("arch, residual, heads, mlp", ARCHS)
def test_rotation_is_exact(graphs, arch, residual, heads, mlp):
    graph0, weights = graphs(arch)
    graph, w, report = _rotated(graph0, weights, "online")
    assert (report["residual"] is not None) == residual, report
    assert report["heads"] == heads and report["mlp"] == mlp, report
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    want = cal.GraphRunner(graph0, weights).logits(ids)
    got = cal.GraphRunner(graph, w.values).logits(ids)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
    changed = [n for n in weights if not torch.equal(weights[n], w.values[n])]
    assert changed, "nothing was rotated"


def test_tied_head_keeps_one_table(graphs):
    graph0, weights = graphs("llama_tied")
    stream, _ = find_stream(graph0)
    assert stream is not None and len(stream.tied_heads) == 1
    graph, _, report = _rotated(graph0, weights, "offline")
    assert report["residual"]["head_gemms_added"] == 1 and report["mlp"] == 0
    head = graph.node(graph.outputs[0])
    while head.op != "linear":
        head = graph.node(head.inputs[0])
    emb = next(n for n in graph.nodes() if n.op == "embedding")
    assert head.inputs[1] == emb.inputs[0]  # still one table
    added = graph.node(head.inputs[0])
    assert added.op == "linear" and is_rotation_linear(graph, added)
    # ... and that GEMM runs on the sampled rows only, after the row selection.
    assert graph.node(added.inputs[0]).op == "index_select"


def test_untied_head_gets_no_gemm(graphs):
    graph, _, report = _rotated(*graphs("llama"), "offline")
    assert report["residual"]["head_gemms_added"] == 0
    assert not any(is_rotation_linear(graph, n) for n in graph.nodes() if n.op == "linear")
