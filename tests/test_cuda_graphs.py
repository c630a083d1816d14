"""Decode steps padded to a CUDA-graph bucket give the unpadded step's logits and KV writes.
On the CPU the padded buffers run eagerly (capture=False): the padding is what can go wrong;
capture and replay themselves are torch's."""

from __future__ import annotations

import pytest
import torch

from llm_engine.runtime import Engine, SamplingParams
from llm_engine.runtime.cuda_graphs import DecodeGraphs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padded_decode_matches_unpadded(arch, engines):
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=2)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], list(range(40, 70))]
    plain = Engine.load(engines(arch), block_size=4, kv_cache_memory=1 << 20)
    want = plain.generate(prompts, params)

    padded = Engine.load(engines(arch), block_size=4, kv_cache_memory=1 << 20)
    ex = padded.executor
    graphs = DecodeGraphs(ex.runner, ex.cache, max_batch=8, max_blocks=32, device="cpu",
                          capture=False, buckets=(2, 4, 8))
    ex.graphs = graphs
    calls = []
    original = graphs.run

    def counting(feeds):
        calls.append(feeds["input_ids"].shape[-1])
        return original(feeds)

    graphs.run = counting
    got = padded.generate(prompts, params)
    assert calls and set(calls) <= {1, 2, 3}  # decode steps of 1-3 sequences went padded
    assert 4 in graphs._static  # three sequences ran in the bucket of four
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        for wl, gl in zip(w.logprobs, g.logprobs):
            for k in wl:
                assert gl[k] == pytest.approx(wl[k], abs=1e-5)


def test_bucket_choice_and_limits():
    graphs = DecodeGraphs(None, None, max_batch=20, max_blocks=8, device="cpu",
                          capture=False, buckets=(1, 2, 4, 8, 16, 32))
    assert graphs.buckets == (1, 2, 4, 8, 16, 20)
    assert [graphs.bucket(n) for n in (1, 3, 9, 17, 20, 21)] == [1, 4, 16, 20, 20, None]
    feeds = {"input_ids": torch.zeros(1, 3, dtype=torch.long),
             "context_lens": torch.ones(3, dtype=torch.int32),
             "logits_indices": torch.arange(3),
             "block_tables": torch.zeros(3, 9, dtype=torch.int32)}
    assert not graphs.handles(feeds)  # wider block table than captured
    feeds["block_tables"] = torch.zeros(3, 8, dtype=torch.int32)
    assert graphs.handles(feeds)
    feeds["context_lens"] = torch.ones(2, dtype=torch.int32)  # a prefill chunk in the batch
    assert not graphs.handles(feeds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_with_graphs_matches_cpu_reference(engines):
    """On a GPU: Triton kernels + CUDA-graph decode give the CPU reference's greedy tokens."""
    params = SamplingParams(temperature=0, max_tokens=12)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], list(range(40, 70))]
    want = Engine.load(engines("llama"), block_size=4, kv_cache_memory=1 << 20)
    gpu = Engine.load(engines("llama"), device="cuda", block_size=4, kv_cache_memory=1 << 20)
    assert gpu.kernel_backend == "triton" and gpu.executor.graphs is not None
    for w, g in zip(want.generate(prompts, params), gpu.generate(prompts, params)):
        assert g.token_ids == w.token_ids
    assert gpu.executor.graphs._graphs  # decode steps were captured and replayed
