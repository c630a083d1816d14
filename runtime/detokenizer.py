"""Streaming detokenization: generated ids become text deltas that add up to `Tokenizer.decode`.

Apart from tokenizer.py because it is per-request state the engine keeps while a request
generates, not part of loading a tokenizer or encoding with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from llm_engine.runtime.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"

# Tokens held back (text ending in U+FFFD) before we look for a split point directly. Valid text
# almost never needs more than 4 (one UTF-8 char); past this it is usually invalid bytes, whose
# U+FFFD will never resolve, and holding them would grow the decode window without bound.
_HOLD_LIMIT = 8


class IncrementalDetokenizer:
    """Turns generated ids into text deltas, one token at a time.

    Decoding a token alone is wrong in general: a character's UTF-8 bytes may span tokens
    (byte-level and byte-fallback vocabularies) and SentencePiece decoders strip the first token's
    leading space. So, as in vLLM / TGI, each step decodes a short window [prefix, end) and emits
    the part past the text of [prefix, read); text ending in U+FFFD is held back until the
    character completes. Windows stay a few tokens long, so a step costs O(1) amortised.

    The joined deltas (after `flush()`) equal `tokenizer.decode(output_ids)`: the same text a
    non-streaming caller gets. That is why the prompt is not used as decoding context: with it,
    SentencePiece tokenizers would stream a leading space that decode(output_ids) strips.
    `prompt_ids` is accepted for call-site compatibility with vLLM/TGI-style detokenizers.

    Exact for all input of byte-level (GPT-2 style) tokenizers and for valid text everywhere. For
    invalid bytes under a byte-fallback decoder, which replaces a whole run of byte tokens with
    U+FFFD once any of it is invalid, text already streamed cannot be taken back.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = len(prompt_ids)
        self.skip_special_tokens = skip_special_tokens
        self.output_ids: list[int] = []
        # Ids that reach the decoder: skipped special tokens are left out here (the backend would
        # drop them anyway), so a run of them cannot grow the window, and the window never starts
        # on one, which would move SentencePiece's leading-space strip onto the next token.
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (O(length) per call; the deltas are the cheap interface)."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def step(self, token_id: int) -> str:
        """Feed one generated id; return the newly completed text (often "", never a partial
        character of valid text)."""
        token_id = int(token_id)
        self.output_ids.append(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.skipped_ids:
            return ""
        ids = self._ids
        ids.append(token_id)
        window = self._decode(ids[self._prefix:])
        if not window.endswith(REPLACEMENT_CHAR):
            return self._emit(window[len(self._prefix_text):], len(ids))
        if (len(ids) - self._read) % _HOLD_LIMIT == 0:
            return self._emit_at_clean_split(window)
        return ""

    def flush(self) -> str:
        """End of output: return held-back text, including U+FFFD for an incomplete trailing
        character, so that the deltas add up to decode(output_ids)."""
        ids = self._ids
        delta = self._decode(ids[self._prefix:])[len(self._prefix_text):]
        self._prefix = self._read = len(ids)
        self._prefix_text = ""
        return self._record(delta)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, delta: str, end: int) -> str:
        # The new window starts where the emitted text did: one step of left context is enough
        # for the leading-space rule, and this keeps the window a few tokens long.
        self._prefix, self._read = self._read, end
        self._prefix_text = self._decode(self._ids[self._prefix:end])
        return self._record(delta)

    def _emit_at_clean_split(self, window: str) -> str:
        """Too many tokens held: find the last token boundary c where decoding [prefix, c) and
        [c, end) separately gives the same text as decoding the window whole. Everything before c
        is then final, even if it contains U+FFFD (invalid bytes), and the window restarts at c."""
        ids = self._ids
        for c in range(len(ids) - 1, self._read, -1):
            head = self._decode(ids[self._prefix:c])
            if head.startswith(self._prefix_text) and head + self._decode(ids[c:]) == window:
                self._prefix = self._read = c
                delta = head[len(self._prefix_text):]
                self._prefix_text = ""
                return self._record(delta)
        return ""  # no boundary is safe yet (one long character run); keep holding

    def _record(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta


__all__ = ["REPLACEMENT_CHAR", "IncrementalDetokenizer"]
