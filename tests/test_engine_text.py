"""Text in and out of the engine, on the tiny llama whose checkpoint carries a byte-level BPE
(tests/models.py): text prompts and chat templates tokenize as HF does, stop strings cut the
output (and streaming never shows text that is cut later), streamed deltas add up to the final
text, and multi-byte characters split over several tokens stream whole."""

from __future__ import annotations

import json

import pytest

from llm_engine.runtime import Engine, SamplingParams
from llm_engine.runtime.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

# ASCII-heavy greedy output from the random model (good for stop strings), and a unicode prompt
# whose output splits characters over byte tokens.
PROMPTS = ["Hello, world!", "Paris is", "Once upon a time"]
UNICODE = "naïve café 日本語"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def engine(engines):
    return Engine.load(engines("llama"), block_size=4, kv_cache_memory=4 << 20)


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoints):
    from transformers import AutoTokenizer

    ckpt, _ = checkpoints("llama")
    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def free_runs(engine):
    """Greedy output of PROMPTS + [UNICODE] with no stop condition: the reference."""
    return engine.generate([*PROMPTS, UNICODE], _greedy())


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": MAX_TOKENS, **kw})


def _stream(engine: Engine, prompt, params: SamplingParams) -> tuple[list[str], object]:
    deltas, last = [], None
    for last in engine.stream(prompt, params):
        deltas.append(last.delta_text)
    return deltas, last


def _stream_all(engine: Engine, prompts, params) -> list[tuple[list[str], object]]:
    """Like _stream for several requests at once (they share steps: faster)."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    deltas: dict[str, list[str]] = {i: [] for i in ids}
    last: dict[str, object] = {}
    while len(last) < len(ids):
        for out in engine.step():
            deltas[out.request_id].append(out.delta_text)
            if out.finished:
                last[out.request_id] = out
    return [(deltas[i], last[i]) for i in ids]


def _stop_string(text: str, length: int, start: int = 1) -> tuple[str, int]:
    """A `length`-char piece of `text` from `start` on, free of U+FFFD and not found before
    `start`, returned with its first occurrence."""
    for i in range(start, len(text) - length):
        piece = text[i:i + length]
        if REPLACEMENT_CHAR not in piece and piece.strip() and text.index(piece) >= start:
            return piece, text.index(piece)
    raise AssertionError(f"no usable stop string in {text[start:]!r}")


def test_builder_copies_the_tokenizer(engines, engine, hf_tokenizer):
    meta = json.loads((engines("llama") / "engine.json").read_text())
    assert meta["tokenizer"] == "tokenizer"
    assert "tokenizer/tokenizer.json" in meta["files"]
    assert meta["generation"]["eos_token_ids"] == []  # the model config names no eos
    assert engine.tokenizer.vocab_size == engine.vocab_size == 320
    assert engine.tokenizer.eos_token == "</s>" and engine.tokenizer.bos_token_id == 0
    for text in [*PROMPTS, UNICODE]:
        assert engine.tokenizer.encode(text) == hf_tokenizer.encode(text)


def test_text_prompt_matches_token_ids(engine, free_runs, hf_tokenizer):
    texts = [*PROMPTS, UNICODE]
    ids = [hf_tokenizer.encode(t) for t in texts]
    by_ids = engine.generate(ids, _greedy())
    for text, prompt_ids, out, ref in zip(texts, ids, free_runs, by_ids):
        assert out.prompt == text and out.prompt_token_ids == prompt_ids
        assert ref.prompt is None and ref.token_ids == out.token_ids
        assert out.finish_reason == "length" and len(out.token_ids) == MAX_TOKENS
        assert out.text == ref.text == hf_tokenizer.decode(out.token_ids,
                                                           skip_special_tokens=True)


def test_chat_template(engine, hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    text = engine.apply_chat_template(messages)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                    "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=True)
    (out,) = engine.generate([text], _greedy(max_tokens=4))
    im_start, im_end = (engine.tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert out.prompt_token_ids[0] == im_start and out.prompt_token_ids.count(im_end) == 2
    assert out.prompt_token_ids == hf_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert engine.apply_chat_template(messages[1:], add_generation_prompt=False).endswith(
        "<|im_end|>\n")


def test_special_tokens_in_output_text(engine, free_runs):
    """skip_special_tokens=False keeps generated special tokens' text, as decode() does."""
    texts = [*PROMPTS, UNICODE]
    outs = engine.generate(texts, _greedy(skip_special_tokens=False))
    for free, out in zip(free_runs, outs):
        assert out.token_ids == free.token_ids
        assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=False)


def test_stop_strings_truncate_output(engine, free_runs):
    cases = []  # (prompt, free run, stop list, include, expected text)
    for prompt, free in zip(PROMPTS, free_runs):
        for length in (1, 3, 5):
            stop, at = _stop_string(free.text, length)
            cases.append((prompt, free, [stop], False, free.text[:at]))
            cases.append((prompt, free, [stop], True, free.text[:at + len(stop)]))
    # several stop strings: the earliest match wins, whatever the list order
    free = free_runs[0]
    early, at = _stop_string(free.text, 2)
    late, _ = _stop_string(free.text, 4, start=at + 1)
    cases.append((PROMPTS[0], free, [late, early], False, free.text[:at]))

    outs = engine.generate([c[0] for c in cases],
                           [_greedy(stop=c[2], include_stop_str_in_output=c[3]) for c in cases])
    for (prompt, free, stop, include, expected), out in zip(cases, outs):
        assert (out.finish_reason, out.text) == ("stop", expected), (prompt, stop, include)
        assert out.token_ids == free.token_ids[:len(out.token_ids)]
        assert len(out.token_ids) < MAX_TOKENS


def test_streamed_deltas_never_hold_text_that_is_cut(engine, free_runs):
    cases = []
    for prompt, free in zip(PROMPTS, free_runs):
        stop, at = _stop_string(free.text, 4)
        cases += [(prompt, stop, False, free.text[:at]),
                  (prompt, stop, True, free.text[:at + len(stop)])]
    results = _stream_all(engine, [c[0] for c in cases],
                          [_greedy(stop=[c[1]], include_stop_str_in_output=c[2]) for c in cases])
    for (prompt, stop, include, expected), (deltas, last) in zip(cases, results):
        assert last.finish_reason == "stop", (prompt, stop)
        assert "".join(deltas) == last.text == expected
        shown = ""
        for d in deltas:  # every prefix a client was shown is a prefix of the final text
            shown += d
            assert expected.startswith(shown), (prompt, stop, include, shown)


def test_stream_deltas_add_up_to_the_final_text(engine, free_runs):
    for prompt, free in zip(PROMPTS[:2], free_runs):
        deltas, last = _stream(engine, prompt, _greedy())
        assert last.finish_reason == "length" and last.token_ids == free.token_ids
        assert "".join(deltas) == last.text == free.text
        assert sum(1 for d in deltas if d) > 1  # it streamed, not one final lump
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_closing_a_stream_aborts_its_request(engine):
    stream = engine.stream(PROMPTS[0], _greedy())
    next(stream)
    assert engine.has_unfinished()
    stream.close()
    assert not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_multibyte_characters_stream_whole(engine, free_runs):
    """Characters whose UTF-8 bytes span several byte-level tokens are held until complete."""
    tok = engine.tokenizer
    text = "naïve café — 日本語 🙂 €100"
    ids = tok.encode(text)
    assert any(REPLACEMENT_CHAR in tok.decode([i]) for i in ids), \
        "the tiny vocab should split some characters over several tokens"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.step(i) for i in ids]
    assert "" in deltas and not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text
    # The same through the engine on what the random model generates for a unicode prompt: its
    # output splits characters over tokens too, and the stream still adds up to decode().
    deltas, last = _stream(engine, UNICODE, _greedy())
    assert last.token_ids == free_runs[3].token_ids
    assert any(REPLACEMENT_CHAR in tok.decode([i]) for i in last.token_ids)
    assert any(ord(c) > 127 and c != REPLACEMENT_CHAR for c in last.text)
    assert "".join(deltas) == last.text == tok.decode(last.token_ids)


def test_stop_token_ids_flush_held_text(engine, free_runs):
    """Stopping on a token while the detokenizer holds an incomplete character gives decode()
    of the tokens before the stop token, as finish_reason "length" does: the held bytes used to
    be dropped."""
    tok = engine.tokenizer
    cases = []
    for prompt, free in zip([*PROMPTS, UNICODE], free_runs):
        ids = free.token_ids
        for k in range(1, len(ids)):
            if ids[k] not in ids[:k] and tok.decode(ids[:k]).endswith(REPLACEMENT_CHAR):
                cases.append((prompt, ids, k))
                break
    assert cases, "no greedy output stops mid-character; pick other prompts"
    outs = engine.generate([c[0] for c in cases],
                           [_greedy(stop_token_ids=[c[1][c[2]]]) for c in cases])
    for (_, ids, k), out in zip(cases, outs):
        assert out.finish_reason == "stop" and out.token_ids == ids[:k + 1]
        assert out.text == tok.decode(ids[:k])
