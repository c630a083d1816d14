"""Grammar compilation off the engine thread, cached by (spec, tokenizer).

A request submits its spec and gets a Future; the engine keeps scheduling other requests and
admits this one once the future is done. Concurrent requests for the same spec share one
compile (the cache holds futures, not results). llguidance releases the GIL while it builds a
grammar, so a pool thread does not stall the engine thread.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llguidance as llg

from llm_engine.runtime.structured.matcher import Matcher
from llm_engine.runtime.structured.spec import StructuredSpec


@dataclass(frozen=True)
class GrammarTokenizer:
    """llguidance's view of a tokenizer (~0.3 s to build for a 49k vocabulary: build once per
    engine). `digest` identifies the tokenizer in cache keys."""

    llg: llg.LLTokenizer = field(repr=False)
    digest: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]


def grammar_tokenizer(tokenizer_json: str, eos_token_ids: Sequence[int],
                      vocab_size: int | None = None) -> GrammarTokenizer:
    """From a HF `tokenizers` tokenizer.json text and the ids that end generation (all of them:
    the grammar allows them once the output is complete)."""
    eos = [int(i) for i in eos_token_ids]
    if not eos:
        raise ValueError("structured outputs need at least one end-of-sequence token id")
    tokenizer_json = _added_tokens_as_text(tokenizer_json)
    tok = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
    digest = hashlib.sha256(tokenizer_json.encode() + json.dumps(eos).encode()
                            + str(vocab_size).encode()).hexdigest()[:16]
    return GrammarTokenizer(tok, digest, tok.vocab_size, tuple(eos))


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte-to-character table, which ByteLevel vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _uses_byte_level(spec: Any) -> bool:
    if not isinstance(spec, dict):
        return False
    return spec.get("type") == "ByteLevel" or any(
        _uses_byte_level(d) for d in spec.get("decoders") or () if isinstance(d, dict))


def _added_tokens_as_text(tokenizer_json: str) -> str:
    """llguidance treats every added token as special (matched only as `<[id]>`, never as
    text), yet for forced text it tokenizes with the full tokenizer, which does produce a
    non-special added token (Qwen's `<tool_call>`, `<think>`): the mask then allows a token
    the matcher rejects. Non-special added tokens are moved into the model's vocabulary, so
    llguidance sees them as the text they are; special ones stay special. Vocabularies that
    are not a dict (Unigram), and contents this cannot spell, are left as they were."""
    try:
        data = json.loads(tokenizer_json)
        vocab = data["model"]["vocab"]
    except (ValueError, KeyError, TypeError):
        return tokenizer_json
    if not isinstance(vocab, dict):
        return tokenizer_json
    byte_level = _uses_byte_level(data.get("decoder"))
    chars = _byte_level_chars() if byte_level else {}
    ids = set(vocab.values())
    kept, moved = [], 0
    for added in data.get("added_tokens") or ():
        content, tid = added.get("content"), added.get("id")
        if added.get("special", True) or not isinstance(content, str) or not content \
                or tid in ids:
            kept.append(added)
            continue
        if byte_level:
            key = "".join(chars[b] for b in content.encode())
        elif not any(c.isspace() for c in content):  # Metaspace: no spaces to spell as ▁
            key = content
        else:
            kept.append(added)
            continue
        if key in vocab:
            kept.append(added)
            continue
        vocab[key] = tid
        moved += 1
    if not moved:
        return tokenizer_json
    data["added_tokens"] = kept
    return json.dumps(data)


def from_runtime_tokenizer(tokenizer: Any) -> GrammarTokenizer:
    """From runtime/tokenizer.py's Tokenizer (its `backend` is the tokenizers model)."""
    return grammar_tokenizer(tokenizer.backend.to_str(), tokenizer.eos_token_ids,
                             tokenizer.vocab_size)


@dataclass(frozen=True)
class CompiledGrammar:
    """A compiled spec: `matcher()` gives each request its own state, a copy of a pristine
    matcher (microseconds; no recompilation)."""

    spec: StructuredSpec
    tokenizer: GrammarTokenizer
    grammar: str = field(repr=False)
    _pristine: llg.LLMatcher = field(repr=False)

    def matcher(self) -> Matcher:
        return Matcher(self._pristine.deep_copy(), self.tokenizer.vocab_size,
                       self.tokenizer.eos_token_ids)


def grammar_text(spec: StructuredSpec) -> str:
    """llguidance's grammar for a spec. Raises ValueError with llguidance's message."""
    try:
        if spec.kind == "json":
            return llg.LLMatcher.grammar_from_json_schema(spec.value)
        if spec.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"})
        if spec.kind == "choice":
            return llg.grammar_from("choice", list(spec.value))
        if spec.kind == "regex":
            return llg.grammar_from("regex", spec.value)
        return llg.grammar_from("grammar", spec.value)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise ValueError(f"{spec.kind}: {e}") from None
    except Exception as e:  # llguidance raises plain Exceptions from Rust for some inputs
        raise ValueError(f"{spec.kind}: {e}") from e


def compile_spec(spec: StructuredSpec, tokenizer: GrammarTokenizer) -> CompiledGrammar:
    """Compiles on the calling thread; the GrammarCompiler calls it from its pool."""
    grammar = grammar_text(spec)
    # llguidance reports grammar errors as text, not exceptions (an error state on a matcher).
    error = llg.LLMatcher.validate_grammar(grammar, tokenizer.llg)
    if error:
        raise ValueError(f"{spec.kind}: {error.strip()}")
    pristine = llg.LLMatcher(tokenizer.llg, grammar, log_level=0)
    if pristine.is_error():
        raise ValueError(f"{spec.kind}: {pristine.get_error().strip()}")
    return CompiledGrammar(spec, tokenizer, grammar, pristine)


class GrammarCompiler:
    """Thread pool + LRU cache of compile futures. Failed compiles are cached too: the same
    spec fails the same way, and a client resending a bad schema should not cost a compile."""

    def __init__(self, max_workers: int = 2, cache_size: int = 256,
                 compile_fn: Callable[[StructuredSpec, GrammarTokenizer], CompiledGrammar]
                 = compile_spec) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[tuple[str, str], Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self._compile = compile_fn  # tests substitute a slow one
        self.cache_size = cache_size
        self.hits = 0
        self.misses = 0

    def submit(self, spec: StructuredSpec, tokenizer: GrammarTokenizer) -> Future[CompiledGrammar]:
        """The compiled grammar as a future: already done on a cache hit. Its exception, if
        any, is a ValueError carrying llguidance's message."""
        key = (spec.key, tokenizer.digest)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return fut
            self.misses += 1
            fut = self._pool.submit(self._compile, spec, tokenizer)
            self._cache[key] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)  # in-flight futures stay valid for their waiters
            return fut

    def compile(self, spec: StructuredSpec, tokenizer: GrammarTokenizer,
                timeout: float | None = None) -> CompiledGrammar:
        """Blocking form, for callers that are not the engine thread."""
        return self.submit(spec, tokenizer).result(timeout)

    def cache_len(self) -> int:
        with self._lock:
            return len(self._cache)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
