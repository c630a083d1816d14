"""runtime/structured: spec parsing, the compile cache and pool, masks and matchers on SmolLM2's
tokenizer (vocabulary 49152)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from llm_engine.runtime.structured import (
    GrammarCompiler,
    StructuredSpec,
    allocate_bitmask,
    apply_masks,
    fill_bitmasks,
    from_response_format,
    from_structured_outputs,
    grammar_tokenizer,
)
from llm_engine.runtime.structured.compiler import compile_spec
from llm_engine.runtime.structured.spec import parse
from tests.structured_schemas import CASES, CASES_BY_NAME

ROOT = Path(__file__).resolve().parent.parent
EOS = 2  # <|im_end|>
PAD = 64  # models pad the embedding past the vocabulary: those logits must be masked too


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Masks are tiny tensors: on a shared, busy machine torch's thread pool costs ~100x the op.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_json(request) -> str:
    built = ROOT / "engines" / "smollm2" / "tokenizer" / "tokenizer.json"
    if built.is_file():  # an engine built here: skips the GGUF conversion (~10 s)
        return built.read_text(encoding="utf-8")
    # looked up only here, so the shortcut above never pays for the conversion
    tokenizer_dir = request.getfixturevalue("smollm2_dir")
    return (tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gtok(tokenizer_json):
    return grammar_tokenizer(tokenizer_json, [EOS, 0])


@pytest.fixture(scope="module")
def backend(tokenizer_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


@pytest.fixture(scope="module")
def bias(backend) -> torch.Tensor:
    """Random logits alone would write endless strings (a closing quote is 1 token in 49k);
    lifting the one-character structural tokens makes random outputs end soon, while the grammar
    alone decides which of them are legal."""
    vocab = backend.get_vocab_size()
    b = torch.zeros(vocab + PAD)
    for ch in '"{}[],:0123456789-.':
        b[backend.token_to_id(ch)] = 6.0
    b[EOS] = 6.0
    return b


def decode(compiled, backend, bias, seed: int, max_steps: int = 400) -> str:
    g = torch.Generator().manual_seed(seed)
    m = compiled.matcher()
    out: list[int] = []
    for _ in range(max_steps):
        logits = torch.randn((1, bias.numel()), generator=g) * 2 + bias
        token = int(apply_masks(logits, [m])[0].argmax())
        assert token < compiled.tokenizer.vocab_size  # padded columns are masked
        m.advance(token)
        if token in compiled.tokenizer.eos_token_ids:
            assert m.is_finished()
            return backend.decode(out)
        out.append(token)
    raise AssertionError(f"no end of sequence in {max_steps} steps: {backend.decode(out)!r}")


# ---------------------------------------------------------------------------------- specs


def test_response_format_parsing():
    assert from_response_format(None) is None
    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}) == StructuredSpec("json_object")
    spec = from_response_format({"type": "json_schema", "json_schema": {
        "name": "p", "strict": True, "schema": CASES_BY_NAME["flat_object"].schema}})
    assert spec.kind == "json" and spec.value == CASES_BY_NAME["flat_object"].schema


def test_structured_outputs_parsing():
    assert from_structured_outputs({"regex": "[a-z]+"}) == StructuredSpec("regex", "[a-z]+")
    assert from_structured_outputs({"choice": ["a", "b"]}).value == ("a", "b")
    assert from_structured_outputs({"grammar": 'start: "x"'}).kind == "grammar"
    assert from_structured_outputs({"json_object": True}).kind == "json_object"
    # vLLM also takes the schema as JSON text; None / False entries count as not set
    spec = from_structured_outputs({"json": '{"type": "integer"}', "regex": None,
                                    "json_object": False})
    assert spec.value == {"type": "integer"}
    assert parse({"choice": ["x"]}) == StructuredSpec("choice", ["x"])
    assert parse(spec) is spec and parse(None) is None


def test_key_is_canonical():
    a = StructuredSpec("json", {"type": "object", "properties": {"a": {"type": "string"}}})
    b = StructuredSpec("json", '{"properties": {"a": {"type": "string"}}, "type": "object"}')
    assert a.key == b.key
    assert StructuredSpec("choice", ["a", "b"]).key != StructuredSpec("choice", ["b", "a"]).key
    assert StructuredSpec("regex", "a").key != StructuredSpec("grammar", "a").key


@pytest.mark.parametrize("call, message", [
    (lambda: from_response_format({"type": "json_schema", "json_schema": {"name": "x"}}),
     "json_schema.schema is missing"),
    (lambda: from_response_format({"type": "xml"}), "response_format.type 'xml'"),
    (lambda: from_response_format({"type": "json_schema", "json_schema": {
        "schema": {"type": "objekt"}}}), "#/type: 'objekt' is not a JSON type"),
    (lambda: from_structured_outputs({"json": {"type": "array", "minItems": -1}}),
     "#/minItems must be a non-negative integer"),
    (lambda: from_structured_outputs({"json": {"properties": {"a": {"maximum": "9"}}}}),
     "#/properties/a/maximum must be a number"),
    (lambda: from_structured_outputs({"json": {"type": "integer", "minimum": 5, "maximum": 1}}),
     "minimum 5 > maximum 1"),
    (lambda: from_structured_outputs({"json": {"anyOf": []}}), "#/anyOf must be a non-empty"),
    (lambda: from_structured_outputs({"json": "{not json"}), "not valid JSON"),
    (lambda: from_structured_outputs({"json": 3}), "must be an object or a boolean"),
    (lambda: from_structured_outputs({"regex": "a", "choice": ["a"]}), "exactly one"),
    (lambda: from_structured_outputs({}), "exactly one"),
    (lambda: from_structured_outputs({"ebnf": "x"}), "unsupported field(s) ebnf"),
    (lambda: from_structured_outputs({"choice": []}), "at least one"),
    (lambda: from_structured_outputs({"choice": "ab"}), "list of strings"),
    (lambda: from_structured_outputs({"choice": ["a", 1]}), "must be strings"),
    (lambda: from_structured_outputs({"regex": ""}), "non-empty string"),
    (lambda: StructuredSpec("xml", "x"), "not one of"),
])
def test_spec_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# ---------------------------------------------------------------------------------- compiling


def test_compile_cache_hit_and_tokenizer_in_key(gtok, tokenizer_json):
    compiler = GrammarCompiler(max_workers=1, cache_size=2)
    try:
        spec = StructuredSpec("json", CASES_BY_NAME["flat_object"].schema)
        first = compiler.submit(spec, gtok)
        same = compiler.submit(StructuredSpec("json", json.dumps(spec.value)), gtok)
        assert same is first and compiler.hits == 1
        assert first.result(10).spec == spec
        other_tok = grammar_tokenizer(tokenizer_json, [EOS])  # other EOS set: other digest
        assert compiler.submit(spec, other_tok) is not first
        compiler.submit(StructuredSpec("regex", "a+"), gtok)
        assert compiler.cache_len() == 2  # bounded: the oldest entry went
        assert compiler.submit(spec, gtok) is not first
    finally:
        compiler.close()


@pytest.mark.parametrize("spec, message", [
    (StructuredSpec("regex", "[a-"), "unclosed character class"),
    (StructuredSpec("json", {"properties": {"a": {"$ref": "#/$defs/missing"}}}),
     "/$defs/missing"),
    (StructuredSpec("grammar", "start: undefined_rule"), "undefined_rule"),
])
def test_compile_errors_carry_the_library_message(gtok, spec, message):
    compiler = GrammarCompiler(max_workers=1)
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            compiler.compile(spec, gtok, timeout=10)
    finally:
        compiler.close()


def test_slow_compile_does_not_block_other_requests(gtok, backend, bias):
    release = threading.Event()
    ready = compile_spec(StructuredSpec("choice", ["yes", "no"]), gtok)

    def compile_fn(spec, tok):
        if spec.kind == "regex":  # stands in for a grammar that takes long to build
            release.wait(10)
        return compile_spec(spec, tok)

    compiler = GrammarCompiler(max_workers=2, compile_fn=compile_fn)
    try:
        slow = compiler.submit(StructuredSpec("regex", "[0-9]{4}"), gtok)
        t0 = time.perf_counter()
        # Another request keeps decoding, and a third one's grammar compiles meanwhile.
        assert decode(ready, backend, bias, seed=0) in ("yes", "no")
        fast = compiler.submit(StructuredSpec("json", {"type": "boolean"}), gtok)
        assert fast.result(10).matcher() is not None
        assert time.perf_counter() - t0 < 5 and not slow.done()
        release.set()
        assert re.fullmatch("[0-9]{4}", decode(slow.result(10), backend, bias, seed=1))
    finally:
        release.set()
        compiler.close()


# ---------------------------------------------------------------------------------- decoding


def _validate(instance, schema) -> None:
    import jsonschema

    jsonschema.validate(instance, schema)


@pytest.mark.parametrize("name", ["flat_object", "integer_range", "enum_string", "array_min_max",
                                  "defs_ref", "string_pattern", "any_of", "tool_call"])
def test_random_decoding_yields_valid_json(gtok, backend, bias, name):
    case = CASES_BY_NAME[name]
    compiled = compile_spec(StructuredSpec("json", case.schema), gtok)
    for seed in range(2):
        text = decode(compiled, backend, bias, seed)
        _validate(json.loads(text), case.schema)


def test_json_object_regex_choice_and_grammar(gtok, backend, bias):
    text = decode(compile_spec(StructuredSpec("json_object"), gtok), backend, bias, 0)
    assert isinstance(json.loads(text), dict)
    regex = r"[A-Z]{2}-[0-9]{3}"
    assert re.fullmatch(regex, decode(compile_spec(StructuredSpec("regex", regex), gtok),
                                      backend, bias, 0))
    choices = ["red", "green", "light blue", 'say "hi"']
    compiled = compile_spec(StructuredSpec("choice", choices), gtok)
    assert {decode(compiled, backend, bias, s) for s in range(4)} <= set(choices)
    lark = 'start: "x=" NUM ";"\nNUM: /[0-9]{1,3}/'
    assert re.fullmatch(r"x=[0-9]{1,3};", decode(compile_spec(StructuredSpec("grammar", lark),
                                                              gtok), backend, bias, 0))


def test_shared_cases_walk_and_reject(gtok, backend):
    """Every shared schema lets its valid instance through and rejects its invalid one."""
    from tests.structured_schemas import dump

    for case in CASES:
        compiled = compile_spec(StructuredSpec("json", case.schema), gtok)
        m = compiled.matcher()
        for t in backend.encode(dump(case.valid), add_special_tokens=False).ids:
            assert m.allowed(t), case.name
            m.advance(t)
        assert m.is_accepting() and m.allowed(EOS), case.name
        if case.invalid is not None:
            m = compiled.matcher()
            ids = backend.encode(dump(case.invalid), add_special_tokens=False).ids
            ok = True
            for t in ids:
                if not m.allowed(t):
                    ok = False
                    break
                m.advance(t)
            assert not (ok and m.allowed(EOS)), f"{case.name}: {case.constraint} not enforced"


# ---------------------------------------------------------------------------------- masks


def test_apply_masks_batched_rows(gtok):
    vocab = gtok.vocab_size
    compiled = compile_spec(StructuredSpec("choice", ["yes", "no"]), gtok)
    m1, m2 = compiled.matcher(), compiled.matcher()
    logits = torch.randn(4, vocab + PAD)
    before = logits.clone()
    logits = apply_masks(logits, [None, m1, None, m2])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    for row in (1, 3):
        allowed = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert allowed and all(m1.allowed(t) for t in allowed)
        assert torch.isinf(logits[row, vocab:]).all()  # padded vocabulary
    # Fewer columns than the vocabulary (a trimmed head) still works, and no matcher is a no-op.
    narrow = torch.randn(2, vocab - 7)
    narrowed = apply_masks(narrow, [m1, None])
    assert torch.isfinite(narrowed[0]).sum() >= 1 and torch.equal(narrowed[1], narrow[1])
    same = torch.randn(2, 10)
    assert torch.equal(apply_masks(same.clone(), [None, None]), same)
    with pytest.raises(ValueError, match="N = 1 matchers"):
        apply_masks(torch.zeros(2, vocab), [m1])


def test_rollback_and_errors(gtok, backend):
    compiled = compile_spec(StructuredSpec("regex", "abc|abd"), gtok)
    m = compiled.matcher()
    a, b, c, d = (backend.token_to_id(x) for x in "abcd")
    m.advance(a)
    m.advance(b)
    m.advance(c)
    assert m.is_accepting() and not m.allowed(d)
    m.rollback(1)
    assert m.allowed(d) and not m.is_accepting()
    assert m.advance_many([d, a]) == 1 and m.is_accepting()
    with pytest.raises(ValueError, match="rejected by the grammar"):
        compiled.matcher().advance(d)


def test_fill_bitmasks_draft_rows_match_stepwise_masks(gtok, backend):
    """A speculative chunk's rows are the masks after each draft, filled in one batched call
    that leaves the matcher where it was; drafts are cut at the first forbidden one."""
    compiled = compile_spec(StructuredSpec("regex", "abc|abd"), gtok)
    a, b, c = (backend.token_to_id(x) for x in "abc")
    m, other = compiled.matcher(), compiled.matcher()
    assert m.valid_prefix([a, b, c]) == 3 and m.valid_prefix([a, c, b]) == 1
    assert m.valid_prefix([b]) == 0 and m.valid_prefix([]) == 0
    assert m.valid_prefix([a, b, c, EOS]) == 3  # end-of-sequence is the mask's, not a draft
    bitmask = allocate_bitmask(5, gtok.vocab_size)
    fill_bitmasks([(other, 0, ()), (m, 1, [a, b])], bitmask)
    expected = []
    for prefix in ([], [a], [a, b]):
        step = compiled.matcher()
        for t in prefix:
            step.advance(t)
        row = allocate_bitmask(1, gtok.vocab_size)
        step.fill_mask(row[0])
        expected.append(row[0])
    assert torch.equal(bitmask[0], expected[0])
    for i in range(3):
        assert torch.equal(bitmask[1 + i], expected[i])
    assert (bitmask[4] == -1).all()  # a row no entry names stays all-ones
    m.advance(a)  # still at the start: the fill rolled its drafts back
    # llguidance writes through a raw pointer: rows out of range or shared are refused
    for entries in ([(m, 4, [b])], [(m, -1, ())], [(m, 0, ()), (other, 0, ())]):
        with pytest.raises(ValueError, match="out of range or shared"):
            fill_bitmasks(entries, allocate_bitmask(5, gtok.vocab_size))
    with pytest.raises(ValueError, match="words per row"):
        fill_bitmasks([(m, 0, ())], allocate_bitmask(1, gtok.vocab_size + 64))
    with pytest.raises(ValueError, match="contiguous CPU int32"):
        fill_bitmasks([(m, 0, ())], allocate_bitmask(2, gtok.vocab_size)[:, :-1])


def test_non_special_added_tokens_reach_llguidance_as_text():
    """Only non-special added tokens move into the vocabulary, spelled the way the model's
    decoder reads them (GPT-2 byte characters for ByteLevel; as is for Metaspace, unless
    they hold spaces); special tokens, Unigram vocabularies and bad JSON are left alone."""
    import json as _json

    from llm_engine.runtime.structured.compiler import _added_tokens_as_text

    def tok(decoder, vocab, added):
        return _json.dumps({"model": {"type": "BPE", "vocab": vocab}, "decoder": decoder,
                            "added_tokens": [{"id": i, "content": c, "special": s}
                                             for i, c, s in added]})

    byte_level = {"type": "Sequence", "decoders": [{"type": "ByteLevel"}]}
    out = _json.loads(_added_tokens_as_text(tok(byte_level, {"a": 0}, [
        (1, "<eos>", True), (2, "<tool call>", False)])))
    assert out["model"]["vocab"] == {"a": 0, "<toolĠcall>": 2}
    assert [a["id"] for a in out["added_tokens"]] == [1]
    meta = {"type": "Metaspace", "replacement": "▁"}
    out = _json.loads(_added_tokens_as_text(tok(meta, {"a": 0}, [
        (1, "[ARGS]", False), (2, "two words", False)])))
    assert out["model"]["vocab"] == {"a": 0, "[ARGS]": 1}
    assert [a["id"] for a in out["added_tokens"]] == [2]
    unigram = _json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0]]},
                           "added_tokens": [{"id": 1, "content": "<x>", "special": False}]})
    assert _added_tokens_as_text(unigram) == unigram
    assert _added_tokens_as_text("not json") == "not json"
