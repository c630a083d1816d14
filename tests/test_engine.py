"""The runtime end to end on tiny models: in-flight batching, chunked prefill, preemption and
prefix caching all give HF-identical greedy tokens."""

from __future__ import annotations

import random

import pytest
import torch

from llm_engine.runtime import Engine, SamplingParams
from tests.models import ARCHS

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def _prompts(n: int, seed: int = 0, vocab: int = 320) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_staggered(engine: Engine, prompts, params, every: int = 2) -> list:
    """Request i arrives at step i*every while earlier ones are mid-flight."""
    ids: list[str] = []
    done: dict[str, object] = {}
    step = 0
    while len(done) < len(prompts):
        while len(ids) < len(prompts) and len(ids) * every <= step:
            ids.append(engine.add_request(prompts[len(ids)], params))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 10_000, "engine made no progress"
    return [done[i] for i in ids]


@pytest.mark.parametrize("arch", ARCHS)
def test_concurrent_greedy_matches_hf(arch, checkpoints, engines):
    _, hf = checkpoints(arch)
    engine = Engine.load(engines(arch), block_size=4, max_batch_tokens=32,
                         kv_cache_memory=4 << 20)
    prompts = _prompts(9, seed=1)
    outs = run_staggered(engine, prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.finish_reason == "length"
        assert out.token_ids == _hf_greedy(hf, prompt, 24)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_preemption_keeps_outputs_identical(checkpoints, engines):
    _, hf = checkpoints("llama")
    # 17 blocks of 4 tokens: each request (<= 64 tokens) fits alone, 8 at once do not.
    per_block = 2 * 2 * 4 * 2 * 12 * 4  # layers * (K,V) * block * kv heads * head_dim * fp32
    engine = Engine.load(engines("llama"), block_size=4, kv_cache_memory=17 * per_block)
    assert engine.blocks.num_blocks == 17
    prompts = _prompts(8, seed=2)
    outs = run_staggered(engine, prompts, GREEDY, every=1)
    assert engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _hf_greedy(hf, prompt, 24)
    engine.blocks.check()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_request_too_big_for_the_cache_finishes_with_error(engines):
    engine = Engine.load(engines("llama"), block_size=4, kv_cache_memory=3 * 2 * 2 * 4 * 2 * 12 * 4)
    (out,) = engine.generate([list(range(30))], GREEDY)
    assert out.finish_reason == "error" and "--kv-cache-memory" in out.error
    # One that fits to start but outgrows the cache alone stops with "length".
    (out,) = engine.generate([list(range(5))], SamplingParams(temperature=0, max_tokens=50))
    assert out.finish_reason == "length" and len(out.token_ids) == 12 - 5 + 1


def test_prefix_cache_hit_reuses_blocks_and_output(checkpoints, engines):
    _, hf = checkpoints("llama")
    engine = Engine.load(engines("llama"), block_size=4, kv_cache_memory=4 << 20)
    shared = list(range(100, 140))
    a, b = [*shared, 7, 8, 9], [*shared, 10, 11]
    (first,) = engine.generate([a], GREEDY)
    assert first.num_cached_tokens == 0
    (second,) = engine.generate([b], GREEDY)
    assert second.num_cached_tokens == 40  # the 10 full blocks of the shared 40 tokens
    assert engine.blocks.stats.hits == 40
    assert first.token_ids == _hf_greedy(hf, a, 24)
    assert second.token_ids == _hf_greedy(hf, b, 24)
    (again,) = engine.generate([a], GREEDY)  # whole prompt cached but its last block
    assert again.token_ids == first.token_ids and again.num_cached_tokens == 40


def test_seeded_sampling_same_alone_and_in_batch(engines):
    engine = Engine.load(engines("qwen2"), block_size=4, kv_cache_memory=4 << 20)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    prompt = _prompts(1, seed=4)[0]
    (alone,) = engine.generate([prompt], params)
    others = [SamplingParams(temperature=0.8, max_tokens=12, seed=None)] * 4
    batch = engine.generate([*_prompts(4, seed=5)[:2], prompt, *_prompts(4, seed=6)[:2]],
                            [*others[:2], params, *others[2:]])
    assert batch[2].token_ids == alone.token_ids
    (unseeded,) = engine.generate([prompt], SamplingParams(temperature=1.0, max_tokens=16))
    assert len(unseeded.token_ids) == 16


def test_abort_frees_blocks_at_once(engines):
    engine = Engine.load(engines("llama"), block_size=4, kv_cache_memory=4 << 20)
    rid = engine.add_request(list(range(30)), SamplingParams(max_tokens=100))
    engine.step()
    assert engine.blocks.num_free_blocks < engine.blocks.num_blocks
    out = engine.abort(rid)
    assert out.finish_reason == "abort"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.has_unfinished()


def test_stop_token_ids_and_min_tokens(engines):
    engine = Engine.load(engines("llama"), block_size=4, kv_cache_memory=4 << 20)
    prompt = _prompts(1, seed=7)[0]
    (free,) = engine.generate([prompt], GREEDY)
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    (out,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=24,
                                                       stop_token_ids=[stop]))
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first + 1]


def test_prompt_validation(engines):
    engine = Engine.load(engines("llama"), block_size=4, kv_cache_memory=4 << 20)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, 2, 999], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    # llama and qwen2 carry a tiny tokenizer (tests/models.py); mistral takes token ids only.
    no_tokenizer = Engine.load(engines("mistral"), block_size=4, kv_cache_memory=1 << 20)
    with pytest.raises(ValueError, match="no tokenizer"):
        no_tokenizer.add_request("text", GREEDY)
    with pytest.raises(TypeError, match="unknown engine option"):
        Engine.load(engines("llama"), kv_cache_bytes=1)


def test_logprobs_and_prompt_logprobs(checkpoints, engines):
    _, hf = checkpoints("llama")
    engine = Engine.load(engines("llama"), block_size=4, kv_cache_memory=4 << 20)
    prompt = _prompts(1, seed=8)[0]
    (out,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                       prompt_logprobs=2))
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0], -1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert len(lp) == 3 and tok in lp
        assert lp[tok] == pytest.approx(ref[len(prompt) - 1 + i, tok].item(), abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        assert out.prompt_logprobs[t][prompt[t]] == pytest.approx(ref[t - 1, prompt[t]].item(),
                                                                  abs=1e-4)
