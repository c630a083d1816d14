"""Speculative decoding: greedy output identical to plain decoding on every tiny architecture,
the rejection rule's distribution, rollback of rejected drafts across block boundaries, and
speculation under prefix caching, preemption, stops, logprobs, seeds and streaming."""

from __future__ import annotations

import math
import random

import pytest
import torch

from llm_engine.runtime import Engine, SamplingParams
from llm_engine.runtime.sampling import SamplerState
from llm_engine.runtime.speculative import SpeculativeConfig
from llm_engine.runtime.speculative.ngram import NgramIndex
from llm_engine.runtime.speculative.speculator import CostModel, SpecState, Speculator
from llm_engine.runtime.speculative.verify import verify
from tests.models import ARCHS, HUB_ARCHS

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SMALL = dict(block_size=4, kv_cache_memory=4 << 20)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat runs of themselves, so prompt lookup finds matches (and misses)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        run = [rng.randrange(320) for _ in range(rng.randint(3, 9))]
        out.append(run * rng.randint(2, 4) + [rng.randrange(320) for _ in range(3)])
    return out


def _generate(path, prompts, params=GREEDY, **options):
    engine = Engine.load(path, **{**SMALL, **options})
    outs = engine.generate(prompts, params)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # nothing leaked
    engine.blocks.check()
    return engine, outs


FORCED = dict(speculative_adaptive=False)  # speculate on every step, whatever it costs


@pytest.mark.parametrize("arch", ARCHS + HUB_ARCHS)
def test_greedy_identical_with_prompt_lookup_and_a_draft_engine(arch, engines):
    """Every tiny architecture: prompt lookup (drafts kept and rejected) and the engine
    drafting for itself (all kept: K + 1 tokens a step) give plain decoding's tokens."""
    path = engines(arch)
    prompts = _prompts(4, seed=len(arch))
    _, want = _generate(path, prompts)
    eng, got = _generate(path, prompts, speculative="ngram", num_speculative_tokens=3, **FORCED)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert eng.speculator.stats.proposed > 0
    eng, got = _generate(path, prompts, speculative="draft", draft_engine=str(path),
                         num_speculative_tokens=4, **FORCED)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    stats = eng.speculator.stats
    assert stats.accepted == stats.proposed > 0  # the same model agrees with itself


def test_a_different_draft_model_is_verified(engines):
    """The SmolLM2-shaped tiny model drafting for llama's (same vocabulary, other weights): most drafts
    are rejected, the output is still llama's."""
    prompts = _prompts(3, seed=7)
    _, want = _generate(engines("llama"), prompts)
    eng, got = _generate(engines("llama"), prompts, speculative="draft",
                         draft_engine=str(engines("llama_tied")), num_speculative_tokens=3, **FORCED)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    stats = eng.speculator.stats
    assert stats.proposed > 0 and stats.accepted < stats.proposed
    for out in got:
        assert out.metrics["spec_proposed_tokens"] >= out.metrics["spec_accepted_tokens"]


@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
def test_rollback_across_block_boundaries(engines, block_size):
    """Rejected drafts' slots are given back wherever the blocks end: K = 7 drafts cross
    several blocks of 1, 2 or 4 slots; the outputs stay exact and no block leaks."""
    prompts = _prompts(5, seed=3)
    _, want = _generate(engines("llama"), prompts, block_size=block_size)
    _, got = _generate(engines("llama"), prompts, block_size=block_size, speculative="draft",
                       draft_engine=str(engines("llama_tied")), num_speculative_tokens=7, **FORCED)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_with_prefix_caching(engines):
    """Blocks published to the prefix cache hold only accepted tokens: a second wave whose
    prompts are the first wave's prompts + outputs hits the cache and still decodes exactly."""
    path = engines("llama")
    prompts = _prompts(3, seed=11)
    eng = Engine.load(path, **SMALL, speculative="draft", draft_engine=str(engines("llama_tied")),
                      num_speculative_tokens=5, **FORCED)
    first = eng.generate(prompts, GREEDY)
    second_prompts = [p + o.token_ids for p, o in zip(prompts, first, strict=True)]
    second = eng.generate(second_prompts, GREEDY)
    assert sum(o.num_cached_tokens for o in second) > 0
    plain = Engine.load(path, **SMALL, prefix_caching=False)
    assert [o.token_ids for o in second] == \
        [o.token_ids for o in plain.generate(second_prompts, GREEDY)]
    eng.blocks.check()


def test_with_preemption(engines):
    """A cache too small for every request at once: requests are preempted and recomputed
    while speculating; outputs stay exact and every block comes back."""
    path = engines("llama")
    prompts = _prompts(8, seed=5)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    _, want = _generate(path, prompts, params)
    eng = Engine.load(path, block_size=4, speculative="ngram", num_speculative_tokens=4,
                      **FORCED, **_blocks(path, 40))
    outs = eng.generate(prompts, params)
    assert eng.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


def _blocks(path, n: int) -> dict:
    """kv_cache_memory for n blocks of 4 tokens of this engine."""
    import json

    from llm_engine.runtime.executor import KVCacheSpec

    layers = json.loads((path / "engine.json").read_text())["kv_cache"]["layers"]
    return {"kv_cache_memory": n * KVCacheSpec.bytes_per_block(layers, 4)}


def test_stops_max_tokens_and_logprobs_behave_as_without(engines):
    path = engines("llama")
    prompts = _prompts(3, seed=2)
    _, plain = _generate(path, prompts, GREEDY)
    stop_at = plain[0].token_ids[5]
    params = [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_at]),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)]
    want = Engine.load(path, **SMALL).generate(prompts, params)
    eng = Engine.load(path, **SMALL, speculative="draft", draft_engine=str(path),
                      num_speculative_tokens=6, **FORCED)
    got = eng.generate(prompts, params)
    for w, g in zip(want, got, strict=True):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
    assert len(got[0].token_ids) == 7 and len(got[2].token_ids) == 13
    for lw, lg in zip(want[0].logprobs, got[0].logprobs, strict=True):
        assert lw.keys() == lg.keys()
        for t in lw:
            assert lg[t] == pytest.approx(lw[t], abs=1e-4)


def test_stream_may_deliver_several_tokens_at_once(engines):
    path = engines("llama")
    eng = Engine.load(path, **SMALL, speculative="draft", draft_engine=str(path),
                      num_speculative_tokens=4, **FORCED)
    prompt = _prompts(1, seed=9)[0]
    deltas = [o.delta_token_ids for o in eng.stream(prompt, GREEDY)]
    assert max(len(d) for d in deltas) > 1
    assert [t for d in deltas for t in d] == _generate(path, [prompt])[1][0].token_ids


def test_seeded_sampling_reproduces(engines):
    """A seeded sampled request gives the same tokens twice, alone or beside others."""
    path = engines("llama")
    prompts = _prompts(3, seed=4)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=123,
                            ignore_eos=True)
    opts = dict(speculative="draft", draft_engine=str(engines("llama_tied")),
                num_speculative_tokens=3, **FORCED)
    alone = Engine.load(path, **SMALL, **opts).generate([prompts[0]], params)[0].token_ids
    again = Engine.load(path, **SMALL, **opts).generate([prompts[0]], params)[0].token_ids
    batch = Engine.load(path, **SMALL, **opts).generate(prompts, [params] * 3)[0].token_ids
    assert alone == again == batch


# ---- the rejection rule ---------------------------------------------------------------------
def _chi2_pvalue(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    stat = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True) if p > 0)
    dof = sum(1 for p in probs if p > 0) - 1
    # Wilson-Hilferty approximation of the chi-square upper tail
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("proposal", ["sampled", "point"])
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_k=4)])
def test_rejection_rule_keeps_the_target_distribution(proposal, params):
    """The first token a speculative step emits is distributed as the target's processed
    distribution p, whatever the proposal q: checked by a chi-square test over 20,000 draws on
    a 6-token vocabulary (p-value > 1e-4; a wrong rule, e.g. always keeping the draft, gives
    p-values below 1e-100 here)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, generator=gen) * 1.5
    rows = torch.cat([logits, torch.zeros(1, 6)])
    q = torch.tensor([0.05, 0.4, 0.05, 0.3, 0.1, 0.1])
    from llm_engine.runtime.sampling import process_logits

    p = process_logits(logits, [SamplerState(params, [1])])[0].softmax(-1).tolist()
    counts = [0] * 6
    torch.manual_seed(1)
    for _ in range(20_000):
        state = SamplerState(params, [1])
        d = int(torch.multinomial(q, 1)) if proposal == "sampled" else 3
        first: list[int] = []
        verify(rows, [d], q[None] if proposal == "sampled" else None, state,
               lambda s, out=first: out.append(s.token_id) or False)
        counts[first[0]] += 1
    assert _chi2_pvalue(counts, p) > 1e-4, (counts, p)


def test_verify_greedy_counts_and_stops():
    rows = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    state = SamplerState(SamplingParams(temperature=0), [0])
    got: list[int] = []
    assert verify(rows, [1, 2, 0], None, state, lambda s: got.append(s.token_id) or True) == 3
    assert got == [1, 2, 0, 1]  # all kept, plus the bonus
    got.clear()
    assert verify(rows, [1, 0, 0], None, state, lambda s: got.append(s.token_id) or True) == 1
    assert got == [1, 2]  # the correction replaces the first rejected draft
    got.clear()
    assert verify(rows, [1, 2, 0], None, state,
                  lambda s: got.append(s.token_id) or len(got) < 2) == 2
    assert got == [1, 2]  # a stop after two tokens ends the verification


# ---- proposers and policy ------------------------------------------------------------------
def test_ngram_index_proposes_what_followed_the_latest_match():
    idx = NgramIndex(2, 3)
    idx.extend([1, 2, 3, 4, 1, 2, 3, 9, 1, 2])
    assert idx.propose(3) == [3, 9, 1]  # "1 2" last seen before at position 4 -> 3, 9, 1
    idx.extend([1, 2, 3, 4, 1, 2, 3, 9, 1, 2, 3])
    assert idx.propose(2) == [9, 1]  # the longest suffix "1 2 3" wins
    idx.extend([5, 6])  # another sequence: re-indexed
    assert idx.propose(2) == []


def test_policy_turns_speculation_off_when_rows_cost_as_much_as_they_save():
    spec = Speculator(SpeculativeConfig("ngram", num_tokens=4))
    reqs = [_FakeReq() for _ in range(8)]
    states = [SpecState(alpha=0.8) for _ in reqs]
    for n in range(1, 40):  # memory-bound: 10 ms a step, 10 us a row
        spec.step_done(n, 0.010 + 1e-5 * n)
    assert spec._plan(states, reqs) == [4] * 8
    spec.cost = CostModel()
    for n in range(1, 40):  # compute-bound: each row costs what the whole step's base does
        spec.step_done(n, 0.001 + 0.01 * n)
    assert spec._plan(states, reqs) == [0] * 8


def test_padded_backend_picks_one_depth_for_the_batch():
    """On the fast path every sequence pays a row per depth: a memory-bound batch takes the
    full depth, a compute-bound one none, and rarely-kept guesses stop early."""
    spec = Speculator(SpeculativeConfig("ngram", num_tokens=4), padded=True)
    states = [SpecState(alpha=0.8) for _ in range(4)]
    assert spec._plan_padded(states, [4] * 4, a=0.010, b=1e-5, draft=0.0) == [4] * 4
    assert spec._plan_padded(states, [4] * 4, a=0.001, b=0.01, draft=0.0) == [0] * 4
    weak = [SpecState(alpha=0.05) for _ in range(4)]
    assert spec._plan_padded(weak, [4] * 4, a=0.010, b=1e-3, draft=0.0) == [0] * 4
    assert spec._plan_padded(states, [4, 1, 0, 4], a=0.010, b=1e-5, draft=0.0) == [4, 1, 0, 4]


class _FakeReq:
    max_total_tokens = 1000
    all_ids = [1, 2, 3]


def test_options_are_checked():
    with pytest.raises(ValueError, match="speculative='draft' needs draft_engine"):
        SpeculativeConfig("draft")
    with pytest.raises(ValueError, match="num_speculative_tokens must be"):
        SpeculativeConfig("ngram", num_tokens=0)
    with pytest.raises(ValueError, match="choose one of ngram, draft"):
        SpeculativeConfig("medusa")
