"""runtime.sampling: parameter validation, the logits pipeline, draws and logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_engine.runtime import sampling
from llm_engine.runtime.sampling import (
    SamplerState,
    process_logits,
    prompt_logprobs_for,
    sample,
)
from llm_engine.runtime.sampling_params import SamplingParams


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: waking a second intra-op thread only adds latency, which on a
    # busy machine reaches milliseconds per op.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": "hot"}, "temperature must be a finite number"),
    ({"top_k": -2}, "top_k must be -1 or 0 (off) or >= 1"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"min_p": -0.1}, "min_p must be in [0, 1]"),
    ({"min_p": 1.1}, "min_p must be in [0, 1]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]"),
    ({"seed": 2**64}, "seed must be in ["),
    ({"seed": "x"}, "seed must be an integer or None"),
    ({"max_tokens": 0}, "max_tokens must be >= 1 or None"),
    ({"min_tokens": -1}, "min_tokens must be >= 0"),
    ({"min_tokens": 9, "max_tokens": 8}, "min_tokens must be in [0, max_tokens=8]"),
    ({"stop": [1]}, "stop must be a string or a list of strings"),
    ({"stop": [""]}, "stop strings must be non-empty"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must be a list of at most 1024 integers >= 0"),
    ({"ignore_eos": "yes"}, "ignore_eos must be a bool"),
    ({"logprobs": 21}, "logprobs must be in [0, 20] or None"),
    ({"logprobs": -1}, "logprobs must be in [0, 20] or None"),
    ({"prompt_logprobs": 21}, "prompt_logprobs must be in [0, 20] or None"),
    ({"skip_special_tokens": 1}, "skip_special_tokens must be a bool"),
    ({"include_stop_str_in_output": None}, "include_stop_str_in_output must be a bool"),
])
def test_validation_names_field_value_and_range(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert fragment in msg
    bad = next(iter(kwargs.values())) if "min_tokens" not in kwargs else kwargs["min_tokens"]
    assert str(bad) in msg or repr(bad) in msg, msg


def test_validation_message_format():
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 1\.5$"):
        SamplingParams(top_p=1.5)


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.max_tokens, p.logprobs) == (
        1.0, 0, 1.0, 0.0, 16, None)
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=1).temperature == 1.0
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError) as e:
        SamplingParams.from_dict({"temperature": 0.5, "top_q": 0.9})
    msg = str(e.value)
    assert "'top_q'" in msg and "valid:" in msg and "top_p" in msg and "min_tokens" in msg


def test_from_dict_roundtrip_and_nulls():
    p = SamplingParams(temperature=0.3, top_k=5, stop=["a", "b"], seed=7, logprobs=3)
    assert SamplingParams.from_dict(p.to_dict()) == p
    # Null means "default" for fields that cannot be None, and stays None where None is valid.
    q = SamplingParams.from_dict({"temperature": None, "max_tokens": None, "stop": None})
    assert q.temperature == 1.0 and q.max_tokens is None and q.stop == []
    with pytest.raises(ValueError, match="must be an object"):
        SamplingParams.from_dict([("temperature", 1.0)])  # type: ignore[arg-type]


# ---------------------------------------------------------------- helpers


def states_for(params: list[SamplingParams], prompt: list[int] | None = None,
               eos: int | None = None) -> list[SamplerState]:
    return [SamplerState(p, prompt or [], eos) for p in params]


# ---------------------------------------------------------------- greedy and penalties


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = (torch.randn(8, 50, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    params = [SamplingParams(temperature=t) for t in (0.0, 1e-6) * 4]
    out = sample(logits, states_for(params))
    assert [s.token_id for s in out] == logits.float().argmax(dim=-1).tolist()


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5,
                       presence_penalty=0.25)
    # prompt {0, 1}, output 3, 3, 2. Repetition (prompt or output): >0 halved, <0 doubled;
    # then frequency 0.5 * count and presence 0.25 for output tokens only.
    expected = [2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.5 - 0.25, 3.0 / 2 - 1.0 - 0.25, -2.0, 1.0]
    late = SamplerState(p, [0, 1])
    sample(logits, [late])  # builds the tables before any output token
    early = SamplerState(p, [0, 1])  # gets its output before the tables exist
    for s in (late, early):
        for t in (3, 3, 2):
            s.append(t)
    for s in (late, early):
        assert torch.allclose(process_logits(logits, [s])[0], torch.tensor(expected))
    # Token 5 (untouched 1.0) ties token 0 (2.0 halved): greedy takes the first maximum.
    assert sample(logits, [late])[0].token_id == 0
    # Without penalties the same state-less row is argmax of the raw logits.
    assert sample(logits, states_for([SamplingParams(temperature=0)]))[0].token_id == 3


def test_penalties_only_on_penalised_rows_and_input_untouched():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    pen = SamplerState(SamplingParams(temperature=0, repetition_penalty=1.5), [1, 2, 3])
    plain = SamplerState(SamplingParams(temperature=0), [1, 2, 3])
    out = process_logits(logits, [plain, pen, plain])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert not torch.equal(out[1], logits[1])
    sample(logits, [plain, pen, plain])
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- filters


def test_filters_exact_sets():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]

    def kept(**kw) -> set[int]:
        x = process_logits(logits, states_for([SamplingParams(**kw)]))[0]
        return set(torch.isfinite(x).nonzero().flatten().tolist())

    assert kept(top_k=2) == {0, 1}
    assert kept(top_k=-1) == kept(top_k=0) == kept(top_k=9) == {0, 1, 2, 3}
    assert kept(top_p=0.75) == {0, 1}
    assert kept(top_p=0.85) == {0, 1, 2}
    assert kept(top_p=0.01) == {0}
    assert kept(min_p=0.5) == {0, 1}
    assert kept(min_p=0.2) == {0, 1, 2}
    assert kept(top_k=3, top_p=0.75) == {0, 1}
    # top_p works on the top_k-renormalised distribution: over {0, 1} token 1 holds 0.375.
    assert kept(top_k=2, top_p=0.6) == {0}
    assert kept(top_k=2, top_p=0.7) == {0, 1}


def _allowed(row: torch.Tensor, p: SamplingParams, tol: float = 1e-4) -> set[int]:
    """Tokens the filters may keep, from float64 maths and loose bounds (so ties and fp32
    rounding cannot make the implementation look wrong)."""
    z = row.double()
    if p.greedy:
        return set((z == z.max()).nonzero().flatten().tolist())
    z = z / p.temperature
    vocab = z.numel()
    keep = torch.ones(vocab, dtype=torch.bool)
    if 0 < p.top_k < vocab:
        kth = z.sort(descending=True).values[p.top_k - 1]
        keep &= z >= kth - tol * (1 + kth.abs())
    if p.top_p < 1:
        probs = torch.where(keep, z, -math.inf).softmax(-1)
        above = torch.where(probs[None, :] > probs[:, None], probs[None, :], 0.0).sum(-1)
        keep &= above < p.top_p + tol
    if p.min_p > 0:
        keep &= z >= z.max() + math.log(p.min_p) - tol * (1 + z.abs().max())
    return set(keep.nonzero().flatten().tolist())


@st.composite
def _case(draw):
    n = draw(st.integers(1, 4))
    vocab = draw(st.integers(2, 24))
    # Logits from a drawn seed (drawing every element through hypothesis is slow); rounding to
    # halves makes ties common, and tie handling is where filters usually go wrong.
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    logits = torch.randn(n, vocab, generator=g) * draw(st.sampled_from([0.5, 3.0, 10.0]))
    if draw(st.booleans()):
        logits = (logits * 2).round() / 2
    params = [SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.1, 0.7, 1.0, 2.5])),
        top_k=draw(st.one_of(st.sampled_from([-1, 0]), st.integers(1, vocab + 2))),
        top_p=draw(st.one_of(st.just(1.0), st.floats(0.01, 1.0))),
        min_p=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0))),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**32))),
    ) for _ in range(n)]
    return logits, params


@settings(max_examples=100, deadline=None)
@given(_case())
def test_filters_never_leave_allowed_set(case):
    logits, params = case
    states = states_for(params)
    processed = process_logits(logits, states)
    out = sample(logits, states)
    for i, p in enumerate(params):
        allowed = _allowed(logits[i], p)
        if not p.greedy:
            kept = set(torch.isfinite(processed[i]).nonzero().flatten().tolist())
            assert kept and kept <= allowed, (p, kept, allowed)
        assert out[i].token_id in allowed, (p, out[i].token_id, allowed)


def test_min_p_below_float32_range_still_filters():
    # Found by the property test above: min_p=1e-57 rounded to 0 in float32 and kept a token
    # 274 nats below the best one.
    logits = torch.tensor([[-21.7879, 5.6843]])
    params = [SamplingParams(temperature=0.1, min_p=1.0843176091171514e-57)]
    processed = process_logits(logits, states_for(params))
    assert torch.isfinite(processed[0]).tolist() == [False, True]


# ---------------------------------------------------------------- draws


def _chi2(tokens: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    expected = probs.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def test_temperature_draws_match_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    n = 20_000
    torch.manual_seed(1234)  # unseeded rows use torch's default generator
    for t in (1.0, 0.7):
        states = states_for([SamplingParams(temperature=t)] * n)
        tokens = [s.token_id for s in sample(logits.expand(n, -1), states)]
        # 4 degrees of freedom: P(chi2 > 30) ~ 5e-6, so only a wrong distribution fails.
        assert _chi2(tokens, (logits / t).softmax(-1)) < 30


def test_seeded_draws_match_softmax():
    # One seeded request drawing step after step walks its own generator's stream.
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]])
    state = SamplerState(SamplingParams(seed=3, max_tokens=None), [])
    tokens = [sample(logits, [state])[0].token_id for _ in range(3000)]
    assert _chi2(tokens, logits[0].softmax(-1)) < 30


def _run(target_params: SamplingParams, target_logits: list[torch.Tensor], position: int,
         others: list[SamplingParams]) -> list[int]:
    """The target request's tokens when it runs in row `position` beside `others`."""
    other_gen = torch.Generator().manual_seed(100 + position + len(others))
    target = SamplerState(target_params, [1, 2, 3], eos_token_ids=0)
    rest = [SamplerState(p, [4, 5], eos_token_ids=0) for p in others]
    states = [*rest[:position], target, *rest[position:]]
    seq = []
    for step_logits in target_logits:
        rows = [torch.randn(step_logits.numel(), generator=other_gen) * 3 for _ in others]
        rows.insert(position, step_logits)
        out = sample(torch.stack(rows), states)
        for s, o in zip(states, out):
            s.append(o.token_id)
        seq.append(out[position].token_id)
    return seq


def test_seeded_request_is_batch_invariant():
    g = torch.Generator().manual_seed(0)
    vocab, steps = 64, 12
    target_logits = [torch.randn(vocab, generator=g) * 2 for _ in range(steps)]
    target = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2,
                            frequency_penalty=0.3, min_tokens=3, seed=42, max_tokens=None)
    alone = _run(target, target_logits, 0, [])
    assert len(set(alone)) > 3  # actually random, not a fixed point
    assert _run(target, target_logits, 0, []) == alone
    batches = [
        (0, [SamplingParams(temperature=0), SamplingParams(), SamplingParams(seed=7, top_p=0.5)]),
        (2, [SamplingParams(seed=42), SamplingParams(min_p=0.2), SamplingParams(top_k=3)]),
        (3, [SamplingParams(), SamplingParams(), SamplingParams(temperature=0, logprobs=5)]),
        (1, [target, target, target]),  # same seed in other rows: their own streams
    ]
    for position, others in batches:
        assert _run(target, target_logits, position, others) == alone, position
    other_seed = SamplingParams(**{**target.to_dict(), "seed": 43})
    assert _run(other_seed, target_logits, 0, []) != alone


# ---------------------------------------------------------------- min_tokens / ignore_eos


def test_min_tokens_masks_eos_and_stop_ids():
    eos, stop = 3, 4
    logits = torch.zeros(1, 8)
    logits[0, stop], logits[0, eos] = 10.0, 9.0
    for temperature in (0.0, 1.0):
        state = SamplerState(SamplingParams(temperature=temperature, min_tokens=2,
                                            stop_token_ids=[stop], seed=0), [], eos)
        for _ in range(2):
            tok = sample(logits, [state])[0].token_id
            assert tok not in (eos, stop)
            state.append(tok)
        if temperature == 0:
            assert sample(logits, [state])[0].token_id == stop  # min_tokens reached
    # ignore_eos: EOS does not end the request, so min_tokens leaves it allowed; stop ids
    # are still masked.
    state = SamplerState(SamplingParams(temperature=0, min_tokens=2, ignore_eos=True,
                                        stop_token_ids=[stop]), [], eos)
    assert sample(logits, [state])[0].token_id == eos
    # And without min_tokens ignore_eos masks nothing.
    state = SamplerState(SamplingParams(temperature=0, ignore_eos=True), [], eos)
    logits[0, stop] = 0.0
    assert sample(logits, [state])[0].token_id == eos


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_and_include_top_n():
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 30, generator=g) * 3).to(torch.bfloat16)
    raw = logits.float().log_softmax(-1)
    top1 = int(raw[3].argmax())
    params = [SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.3),
              SamplingParams(),
              SamplingParams(logprobs=0, top_k=3),
              # Penalised so the greedy pick is not the raw top-1: it must still be reported.
              SamplingParams(logprobs=1, temperature=0, repetition_penalty=100.0)]
    states = [SamplerState(p, [top1] if i == 3 else [1, 2]) for i, p in enumerate(params)]
    out = sample(logits, states)
    for i, o in enumerate(out):
        assert o.logprob == pytest.approx(float(raw[i, o.token_id]), abs=1e-5)
    assert out[1].top_logprobs is None
    assert out[2].top_logprobs == {out[2].token_id: out[2].logprob}
    top5 = raw[0].topk(5)
    assert list(out[0].top_logprobs)[:5] == top5.indices.tolist()
    for tok, lp in out[0].top_logprobs.items():
        assert lp == pytest.approx(float(raw[0, tok]), abs=1e-5)
    assert out[0].token_id in out[0].top_logprobs
    assert len(out[0].top_logprobs) in (5, 6)
    assert out[3].token_id != top1
    assert out[3].top_logprobs == pytest.approx(
        {top1: float(raw[3, top1]), out[3].token_id: float(raw[3, out[3].token_id])}, abs=1e-5)


def test_prompt_logprobs(monkeypatch):
    monkeypatch.setattr(sampling, "_PROMPT_CHUNK", 2)  # exercise the chunking
    logits = torch.randn(5, 20, generator=torch.Generator().manual_seed(6)).half()
    next_ids = [3, 0, 19, 7, 7]
    raw = logits.float().log_softmax(-1)
    out = prompt_logprobs_for(logits, next_ids, 3)
    assert [o.token_id for o in out] == next_ids
    for t, o in enumerate(out):
        assert o.logprob == pytest.approx(float(raw[t, next_ids[t]]), abs=1e-5)
        assert list(o.top_logprobs)[:3] == raw[t].topk(3).indices.tolist()
        assert next_ids[t] in o.top_logprobs
    assert prompt_logprobs_for(logits, next_ids, 0)[1].top_logprobs == {0: out[1].logprob}
    with pytest.raises(ValueError, match="len\\(next_ids\\)"):
        prompt_logprobs_for(logits, next_ids[:4], 1)


def test_shape_errors():
    with pytest.raises(ValueError, match="N = len\\(states\\) = 1"):
        sample(torch.zeros(2, 4), states_for([SamplingParams()]))
