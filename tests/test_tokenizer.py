"""runtime.tokenizer, runtime.chat_template and runtime.detokenizer against HF transformers (the
oracle) on the real SmolLM2 tokenizer: encode, decode, chat templates, the jinja sandbox, and the
streaming detokenizer."""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llm_engine.runtime.detokenizer import IncrementalDetokenizer
from llm_engine.runtime.tokenizer import Tokenizer
from llm_engine.runtime.tokenizer_errors import TokenizerError

FAST = settings(max_examples=150, deadline=None, database=None)

TEXTS = [
    "",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "whitespace   runs\n\n\n\ttabs\t\t and\r\nCRLF  ",
    "          ",
    "naïve café — “quotes” …",
    "🙂🙃👨‍👩‍👧‍👦 emoji ZWJ 🇫🇷 flags",
    "日本語のテキストと中文和한국어",
    "mixed 日本 text🙂with no spaces",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "code:\n    def f(x):\n        return x ** 2  # comment\n",
    "numbers 1234567890 3.14159 -42",
    "\u200b zero-width \ufeff BOM \u00a0nbsp",
]

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "Answer in French."},
               {"role": "user", "content": "Hello 🙂"}],
    "multi_turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "日本語で挨拶して"},
                   {"role": "assistant", "content": "こんにちは！"},
                   {"role": "user", "content": "  and now in English?  "}],
    "assistant_last": [{"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello! How can I help?"}],
}


@pytest.fixture(scope="session")
def hf(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tok(smollm2_dir) -> Tokenizer:
    return Tokenizer.load(smollm2_dir)


@pytest.fixture(scope="session")
def stream_pool(tok) -> list[int]:
    """Ids worth streaming: pieces of multi-byte characters (emoji and CJK split mid-character),
    every vocabulary entry that is not valid UTF-8 on its own, specials and plain words."""
    partial = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    assert len(partial) > 100  # byte-level vocab: the 128 non-ASCII bytes at least
    return sorted({*tok.encode("🙂日本語👨‍👩‍👧 ñ中文한국어 🇫🇷…"), *partial,
                   *tok.all_special_ids, 3, 4, 5, *tok.encode("Hello world, a b  c\n")})


def _copy_with(src: Path, dst: Path, config: dict[str, Any] | None = None,
               files: dict[str, str] | None = None) -> Path:
    """tokenizer.json from src plus the given tokenizer_config.json and extra files."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    base = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**base, **(config or {})}))
    for name, text in (files or {}).items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_text(text)
    return dst


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.step(i) for i in ids] + [detok.flush()]


# ----------------------------------------------------------------------------- load, ids


def test_special_tokens_match_hf(tok, hf):
    assert tok.bos_token_id == hf.bos_token_id == 1
    assert tok.eos_token_id == hf.eos_token_id == 2
    assert tok.all_special_ids == hf.all_special_ids
    assert tok.vocab_size == len(hf)
    # <|endoftext|> also ends a SmolLM2 turn in practice; the configured eos comes first.
    assert tok.eos_token_ids == (2, 0)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_decode_match_hf(tok, hf, add_special_tokens):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf.encode(text, add_special_tokens=add_special_tokens), text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == \
                hf.decode(ids, skip_special_tokens=skip), text


@FAST
@given(st.text(max_size=60))
def test_encode_random_text_matches_hf(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_bos_comes_from_the_post_processor_like_hf(smollm2_dir, tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors
    from transformers import AutoTokenizer

    # A Llama-style tokenizer.json whose post-processor prepends BOS. The config's add_bos_token
    # is ignored when tokenizer.json exists (HF 5), so it must not add a second one.
    d = _copy_with(smollm2_dir, tmp_path / "t", {"add_bos_token": True, "add_eos_token": True},
                   files={"chat_template.jinja": (smollm2_dir / "chat_template.jinja").read_text()})
    backend = Backend.from_file(str(d / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|>:0 $A:0", pair="<|im_start|>:0 $A:0 $B:1",
        special_tokens=[("<|im_start|>", 1)])
    backend.save(str(d / "tokenizer.json"))
    ours, ref = Tokenizer.load(d), AutoTokenizer.from_pretrained(d)
    for text in ("hi", "", "<|im_start|>user"):
        assert ours.encode(text) == ref.encode(text)
        assert ours.encode(text, add_special_tokens=False) == \
            ref.encode(text, add_special_tokens=False)
    assert ours.encode("hi") == [1, *ours.encode("hi", add_special_tokens=False)]
    # The template already writes BOS; tokenizing its output must not add another.
    messages = CONVERSATIONS["system"]
    assert ours.apply_chat_template(messages, tokenize=True) == \
        ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                return_dict=False)


def test_load_errors_name_the_file(tmp_path, smollm2_dir):
    def message(path: Path) -> str:
        with pytest.raises(TokenizerError) as e:
            Tokenizer.load(path)
        text = str(e.value)
        assert "\n" not in text and "engine build" in text
        return text

    assert "no tokenizer directory" in message(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "tokenizer.json is missing" in message(tmp_path / "empty")

    bad = _copy_with(smollm2_dir, tmp_path / "bad")
    (bad / "tokenizer.json").write_text('{"model": "truncated')
    assert "tokenizer.json is corrupt" in message(bad)

    bad_cfg = _copy_with(smollm2_dir, tmp_path / "bad_cfg")
    (bad_cfg / "tokenizer_config.json").write_text("{not json")
    assert "tokenizer_config.json is not valid JSON" in message(bad_cfg)


# ----------------------------------------------------------------------------- chat template


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                          tokenize=False)
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                  tokenize=True)
    assert ids == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         tokenize=True, return_dict=False)


def test_chat_template_continue_final_message_matches_hf(tok, hf):
    messages = CONVERSATIONS["assistant_last"]
    kw = {"add_generation_prompt": False, "continue_final_message": True}
    assert tok.apply_chat_template(messages, **kw) == \
        hf.apply_chat_template(messages, tokenize=False, **kw)


HELPERS_TEMPLATE = """\
{{ bos_token }}|{{ eos_token }}|{{ custom_flag }}
{% for m in messages %}
{% if loop.index > 2 %}{% break %}{% endif %}
{% if m.role == 'system' %}{% continue %}{% endif %}
{{ m | tojson }} {{ m | tojson(indent=2, sort_keys=True) }} {{ m | tojson(separators=(',', ':')) }}
{% endfor %}
{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}
{{ ns.n }} {{ dict(a=1) | tojson }} {{ tools | tojson }} {{ strftime_now('%Y') }}
{% generation %}{{ add_generation_prompt }}{% endgeneration %}
"""


def test_template_helpers_match_hf(tok, hf):
    messages = CONVERSATIONS["multi_turn"]
    tools = [{"type": "function", "function": {"name": "f", "description": "é <b>"}}]
    kw = {"chat_template": HELPERS_TEMPLATE, "tools": tools, "custom_flag": "yes"}
    ours = tok.apply_chat_template(messages, **kw)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                          **kw)
    assert '"日本語で挨拶して"' in ours  # tojson keeps non-ASCII and does not HTML-escape
    assert '"é <b>"' in ours
    assert str(datetime.now().year) in ours


def test_raise_exception_is_a_template_error(tok):
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        tok.apply_chat_template(CONVERSATIONS["user"],
                                chat_template="{{ raise_exception('roles must alternate') }}")


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{{ messages.append(1) }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
])
def test_sandbox_blocks_escapes(tok, template):
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template(CONVERSATIONS["user"], chat_template=template)


def test_sandbox_applies_to_the_directory_template(smollm2_dir, tmp_path):
    d = _copy_with(smollm2_dir, tmp_path / "evil",
                   files={"chat_template.jinja": "{{ ''.__class__.__mro__ }}"})
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer.load(d).apply_chat_template(CONVERSATIONS["user"])


def test_template_sources(smollm2_dir, tmp_path):
    user = CONVERSATIONS["user"]
    cfg_str = _copy_with(smollm2_dir, tmp_path / "str", {"chat_template": "A{{ messages[0].role }}"})
    assert Tokenizer.load(cfg_str).apply_chat_template(user) == "Auser"

    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T{{ tools }}"}]
    cfg_list = _copy_with(smollm2_dir, tmp_path / "list", {"chat_template": named})
    t = Tokenizer.load(cfg_list)
    assert t.apply_chat_template(user) == "D"
    assert t.apply_chat_template(user, tools=[]) == "T[]"
    assert t.apply_chat_template(user, chat_template="tool_use", tools=[{"a": 1}]) == \
        "T[{'a': 1}]"

    js = _copy_with(smollm2_dir, tmp_path / "json",
                    files={"chat_template.json": json.dumps({"chat_template": "J"})})
    assert Tokenizer.load(js).apply_chat_template(user) == "J"

    # The .jinja file wins over the config, as in HF.
    both = _copy_with(smollm2_dir, tmp_path / "both", {"chat_template": "C"},
                      files={"chat_template.jinja": "F",
                             "additional_chat_templates/rag.jinja": "R"})
    t = Tokenizer.load(both)
    assert t.apply_chat_template(user) == "F"
    assert t.apply_chat_template(user, chat_template="rag") == "R"


def test_template_errors(smollm2_dir, tmp_path):
    user = CONVERSATIONS["user"]
    none = _copy_with(smollm2_dir, tmp_path / "none")
    with pytest.raises(TokenizerError, match="has no chat template"):
        Tokenizer.load(none).apply_chat_template(user)

    no_default = _copy_with(smollm2_dir, tmp_path / "nodef",
                            {"chat_template": [{"name": "a", "template": "A"},
                                               {"name": "b", "template": "B"}]})
    with pytest.raises(TokenizerError, match="none named 'default'"):
        Tokenizer.load(no_default).apply_chat_template(user)

    broken = _copy_with(smollm2_dir, tmp_path / "broken", {"chat_template": "{% for %}"})
    with pytest.raises(TokenizerError, match="does not compile"):
        Tokenizer.load(broken).apply_chat_template(user)

    bad_json = _copy_with(smollm2_dir, tmp_path / "badjson", files={"chat_template.json": "["})
    with pytest.raises(TokenizerError, match=r"chat_template\.json is not valid JSON"):
        Tokenizer.load(bad_json)

    t = Tokenizer.load(smollm2_dir)
    with pytest.raises(TokenizerError, match="empty conversation"):
        t.apply_chat_template([])


def test_compiled_template_is_cached(tok):
    from llm_engine.runtime.chat_template import _compile

    tok.apply_chat_template(CONVERSATIONS["user"])
    before = _compile.cache_info().hits
    tok.apply_chat_template(CONVERSATIONS["system"])
    assert _compile.cache_info().hits == before + 1


# ----------------------------------------------------------------------------- streaming


@FAST
@given(data=st.data())
def test_stream_random_ids_adds_up_to_hf_decode(tok, hf, stream_pool, data):
    ids = data.draw(st.lists(st.sampled_from(stream_pool), max_size=40))
    skip = data.draw(st.booleans())
    detok = IncrementalDetokenizer(tok, tok.encode("<|im_start|>assistant\n"),
                                   skip_special_tokens=skip)
    deltas = _stream(detok, ids)
    expected = hf.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == expected == detok.text
    assert detok.output_ids == ids


@FAST
@given(st.text(st.characters(blacklist_characters="\ufffd", blacklist_categories=("Cs",)),
               max_size=40))
def test_stream_valid_text_never_emits_replacement_char(tok, hf, text):
    ids = tok.encode(text)
    # The GGUF vocabulary lacks a few bytes (e.g. 0xF1), so some text cannot round-trip at all;
    # text spelling a special token (hypothesis tries "<|im_end|>") encodes to an id the stream
    # skips by design.
    assume(hf.decode(ids, skip_special_tokens=True) == text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.step(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert detok.flush() == ""  # valid text completes on its last token
    assert "".join(deltas) == text


def test_stream_holds_split_characters(tok):
    ids = tok.encode("🙂日本語")
    deltas = [IncrementalDetokenizer(tok).step(i) for i in ids[:1]]
    assert deltas == [""]  # the first token is half an emoji
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.step(i) for i in ids) == "🙂日本語"
    assert all(len(d) <= 3 for d in _stream(IncrementalDetokenizer(tok), ids))


def test_stream_keeps_or_skips_special_tokens(tok):
    ids = tok.apply_chat_template(CONVERSATIONS["user"], tokenize=True) + tok.encode("4<|im_end|>")
    kept = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(_stream(kept, ids)) == tok.decode(ids, skip_special_tokens=False)
    skipped = IncrementalDetokenizer(tok)
    assert "".join(_stream(skipped, ids)) == tok.decode(ids)
    assert "<|im_end|>" not in skipped.text


class _CountingBackend:
    """Wraps the tokenizers backend and counts how many ids decode() is handed."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.decoded = backend, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


@pytest.mark.parametrize("kind", ["text", "invalid_bytes", "continuation_bytes", "specials"])
def test_stream_cost_is_constant_per_token(tok, stream_pool, kind):
    import random

    rnd = random.Random(0)
    partial = [i for i in stream_pool if "\ufffd" in tok.decode([i])]
    ids = {
        "text": tok.encode("日本語のテキスト 🙂🙃 and English, mixed. " * 100),
        "invalid_bytes": [rnd.choice(partial) for _ in range(3000)],
        "continuation_bytes": [tok.token_to_id("Ģ")] * 3000,  # byte 0x82, never valid
        "specials": [0, 1, 2] * 1000,
    }[kind]
    counting = _CountingBackend(tok.backend)
    detok = IncrementalDetokenizer(dataclasses.replace(tok, backend=counting))
    assert "".join(_stream(detok, ids)) == tok.decode(ids)
    # Re-decoding the output each step would hand decode() ~len(ids)/2 ids per token.
    assert counting.decoded <= 16 * len(ids)
