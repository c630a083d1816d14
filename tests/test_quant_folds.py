"""The smoothing folds of the quantize pass are exact: dividing a GEMM's input by s at its
producer and multiplying the GEMM's weight columns by s leaves the model's logits unchanged.
Covers the norm folds (q/k/v, gate/up), the up-rows fold (down) and the GQA-tied fold of
o_proj's scale into the V rows (query heads sharing a KV head share a scale)."""

from __future__ import annotations

import copy

import pytest
import torch

from llm_engine.builder.passes.quantize import QuantEnv
from llm_engine.builder.quant import calibrate as cal
from llm_engine.builder.quant.folds import Weights as _Weights
from llm_engine.builder.quant.folds import fold_target as _fold_target
from llm_engine.builder.quant.patterns import through_reshapes


@pytest.fixture(scope="module")
def llama(graphs):
    return graphs("llama")  # 6 query heads over 2 KV heads, q/k/v fused


def _logits(graph, values, ids):
    return cal.GraphRunner(graph, values).logits(ids)


# (arch, the fold kinds its graph must offer): Qwen2's q/k/v carry biases, SmolLM2's shape
# has 9 query heads over 3 KV heads, GPT-2 is multi-head with LayerNorm and a fused c_attn.
ARCHS = [("llama", {"v", "gated_act"}), ("llama_tied", {"v", "gated_act"}),
         ("qwen2", {"v", "gated_act"}), ("mistral", {"v", "gated_act"}), ("gpt2", {"v"})]


@pytest.mark.parametrize("arch, kinds_wanted", ARCHS)
def test_every_fold_is_exact(graphs, arch, kinds_wanted):
    graph0, weights = graphs(arch)
    graph = copy.deepcopy(graph0)
    env = QuantEnv(source=None, buffers={}, tokenizer=None, vocab_size=320, max_seq_len=512)
    w = _Weights(graph, env, dict(weights))
    gen = torch.Generator().manual_seed(0)
    kinds = set()
    for act, readers in cal.linear_inputs(graph).items():
        fold, tie = _fold_target(graph, w, act, readers)
        node = graph.node(readers[0])
        if fold is None:
            continue
        K = graph.producer(node, 1).shape[1]
        s = torch.rand(K, generator=gen) * 1.5 + 0.5
        if tie is not None:
            s = tie(s)
            kinds.add("v")
        else:
            kinds.add(through_reshapes(graph, graph.node(act)).op)
        fold(s)
        for r in readers:
            name = graph.producer(graph.node(r), 1).attrs["name"]
            w.set(name, w.values[name].float() * s)
    # Besides the norms (q/k/v, gate/up): the up rows (down) and the V rows (o_proj).
    assert kinds_wanted <= kinds and kinds & {"rms_norm", "getitem"}, kinds
    ids = torch.randint(0, 320, (40,), generator=gen).tolist()
    want, got = _logits(graph0, weights, ids), _logits(graph, w.values, ids)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()


def test_o_proj_scales_are_tied_per_kv_group(llama):
    graph0, weights = llama
    graph = copy.deepcopy(graph0)
    env = QuantEnv(source=None, buffers={}, tokenizer=None, vocab_size=320, max_seq_len=512)
    w = _Weights(graph, env, dict(weights))
    ties = [tie for act, readers in cal.linear_inputs(graph).items()
            for _, tie in [_fold_target(graph, w, act, readers)] if tie is not None]
    assert ties, "o_proj should have a V-rows fold"
    heads, kv_heads = 6, 2
    K = next(graph.producer(graph.node(r), 1).shape[1]
             for act, readers in cal.linear_inputs(graph).items()
             for r in readers if "o_proj" in graph.producer(graph.node(r), 1).attrs["name"])
    d = K // heads
    t = ties[0](torch.arange(K, dtype=torch.float32)).reshape(kv_heads, heads // kv_heads, d)
    assert torch.equal(t, t[:, :1].expand_as(t))  # equal across the heads of one KV group
    assert not torch.equal(t[0], t[1])  # but free across KV heads and dims
