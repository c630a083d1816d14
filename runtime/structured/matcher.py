"""Per-request grammar state and the step's batched logit mask.

Masks are llguidance's bitmask layout: int32 words, bit t % 32 of word t // 32 set when token t
is allowed. A step computes one [rows, words] bitmask for the constrained rows only, expands it
to a boolean mask and applies -inf in one masked_fill, so unconstrained rows cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance as llg
import numpy as np
import torch


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.zeros((rows, bitmask_words(vocab_size)), dtype=torch.int32)


class Matcher:
    """One request's position in its grammar. Not thread-safe: the engine thread owns it."""

    def __init__(self, inner: llg.LLMatcher, vocab_size: int,
                 eos_token_ids: Sequence[int] = ()) -> None:
        self._m = inner
        self.vocab_size = vocab_size
        self._eos = frozenset(eos_token_ids)

    def fill_mask(self, row: torch.Tensor) -> None:
        """Writes the allowed-token bitmask into `row` (int32, CPU, contiguous,
        bitmask_words(vocab_size) words)."""
        if row.dtype != torch.int32 or row.device.type != "cpu" or not row.is_contiguous() \
                or row.numel() != bitmask_words(self.vocab_size):
            raise ValueError(f"mask row must be a contiguous CPU int32 tensor of "
                             f"{bitmask_words(self.vocab_size)} words")
        # Bounds are checked above; llguidance writes exactly numel * 4 bytes (GIL released).
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def allowed(self, token: int) -> bool:
        """Whether `token` may come next (validates without consuming)."""
        if token in self._eos:  # validate_tokens does not take end-of-sequence tokens
            return self._m.is_accepting()
        return 0 <= token < self.vocab_size and self._m.validate_tokens([token]) == 1

    def advance(self, token: int) -> None:
        """Consumes a sampled token; a token the mask forbade is an error (the sampler broke
        the contract), reported with llguidance's reason."""
        if not self._m.consume_token(token):
            raise ValueError(f"token {token} rejected by the grammar: {self._m.get_error()}")

    def advance_many(self, tokens: Sequence[int]) -> int:
        """Consumes the accepted prefix of `tokens` (speculative drafts); returns its length."""
        n = self._m.try_consume_tokens(list(tokens))
        if self._m.is_error():
            raise ValueError(self._m.get_error())
        return n

    def rollback(self, n: int) -> None:
        """Forgets the last n consumed tokens (rejected speculative tokens)."""
        if n and not self._m.rollback(n):
            raise ValueError(f"cannot roll back {n} tokens: {self._m.get_error()}")

    def is_finished(self) -> bool:
        """The grammar ended (an end-of-sequence token consumed, or nothing more can follow)."""
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        """The text so far is complete: ending now yields a valid output."""
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


def apply_masks(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> torch.Tensor:
    """Sets disallowed tokens of constrained rows to -inf, in place; returns logits.

    logits: [N, V'] with V' >= or < the tokenizer's vocabulary (models pad the embedding:
    columns past the vocabulary are never allowed). matchers[i] None leaves row i untouched.
    """
    if logits.dim() != 2 or logits.shape[0] != len(matchers):
        raise ValueError(f"logits must be [N, V] with N = {len(matchers)} matchers, "
                         f"got {tuple(logits.shape)}")
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    vocab = max(matchers[i].vocab_size for i in rows)
    bitmask = allocate_bitmask(len(rows), vocab)
    for r, i in enumerate(rows):
        matchers[i].fill_mask(bitmask[r, :bitmask_words(matchers[i].vocab_size)])
    # [R, words] -> [R, words * 32] booleans. Bit t % 32 of word t // 32 is bit t of the
    # little-endian byte string (x86, ARM hosts); numpy unpacks it in one pass (torch's int shifts are slower).
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    allowed = torch.from_numpy(bits.view(np.bool_))
    width = logits.shape[1]
    if allowed.shape[1] >= width:
        allowed = allowed[:, :width]
    else:
        pad = torch.zeros((len(rows), width - allowed.shape[1]), dtype=torch.bool)
        allowed = torch.cat([allowed, pad], dim=1)
    for r, i in enumerate(rows):  # words past a matcher's own vocabulary (mixed sizes)
        allowed[r, matchers[i].vocab_size:] = False
    index = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, index)
    sub.masked_fill_(~allowed.to(logits.device), float("-inf"))
    logits.index_copy_(0, index, sub)
    return logits
