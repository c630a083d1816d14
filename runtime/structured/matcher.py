"""Per-request grammar state and the step's batched logit mask.

Masks are llguidance's bitmask layout: int32 words, bit t % 32 of word t // 32 set when token t
is allowed. A step fills one [rows, words] bitmask for the rows it samples (unconstrained rows stay
all-ones), on llguidance's threads while the forward pass runs, then applies it with one
where(); speculative chunks get a row per draft position.
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance as llg
import numpy as np
import torch


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, words] with every token allowed: rows no matcher fills leave their logits as
    they are."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


class Matcher:
    """One request's position in its grammar. Not thread-safe: the engine thread owns it."""

    def __init__(self, inner: llg.LLMatcher, vocab_size: int,
                 eos_token_ids: Sequence[int] = ()) -> None:
        self._m = inner
        self.vocab_size = vocab_size
        self._eos = frozenset(eos_token_ids)
        self.words = bitmask_words(vocab_size)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def copy(self) -> Matcher:
        """An independent matcher at the same position (a draft model's guide)."""
        return Matcher(self._m.deep_copy(), self.vocab_size, self._eos)

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

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` the grammar allows from here, without consuming them
        (speculative drafts are cut to this before the target checks them)."""
        tokens = [int(t) for t in tokens]
        n = 0
        while n < len(tokens) and 0 <= tokens[n] < self.vocab_size \
                and tokens[n] not in self._eos:
            n += 1
        return self._m.validate_tokens(tokens[:n]) if n else 0

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


def _executor() -> llg.LLExecutor:
    """llguidance's thread pool for batched mask fills (one per process: its threads are
    shared by every engine)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llg.LLExecutor()
    return _EXECUTOR


_EXECUTOR: llg.LLExecutor | None = None


def fill_bitmasks(entries: Sequence[tuple[Matcher, int, Sequence[int]]],
                  bitmask: torch.Tensor) -> None:
    """Fills the rows of `bitmask` [rows, words] for many matchers at once, on llguidance's
    own threads with the GIL released (so it can run beside the forward pass).

    entries: (matcher, row, drafts). Row `row` gets the matcher's current mask; with drafts
    d_1..d_k (a speculative chunk, each allowed in turn) rows row+1..row+k get the masks after
    d_1..d_i, and the matcher is left where it was. Rows no entry names are left as they are.
    """
    rows, words = bitmask.shape if bitmask.dim() == 2 else (0, 0)
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" \
            or not bitmask.is_contiguous() or bitmask.dim() != 2:
        raise ValueError("bitmask must be a contiguous CPU int32 tensor [rows, words]")
    taken: set[int] = set()
    for m, row, drafts in entries:
        if m.words != words:
            raise ValueError(f"bitmask has {words} words per row; the matcher's vocabulary "
                             f"needs {m.words}")
        span = range(row, row + len(drafts) + 1)
        # llguidance writes through a raw pointer: every row must exist and belong to one entry
        if row < 0 or span.stop > rows or taken.intersection(span):
            raise ValueError(f"mask rows {span.start}..{span.stop - 1} out of range or shared "
                             f"(bitmask has {rows})")
        taken.update(span)
    plain = [(m._m, row) for m, row, drafts in entries if not drafts]
    drafted = [(m._m, row, [int(t) for t in drafts]) for m, row, drafts in entries if drafts]
    if plain:
        _executor().unsafe_compute_mask_ptr(plain, bitmask.data_ptr(), words * 4, rows)
    if drafted:
        _executor().unsafe_compute_mask_ptr_with_draft_token(drafted, bitmask.data_ptr(),
                                                             words * 4, rows)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, vocab_size: int,
                  constrained: Sequence[bool] | None = None) -> torch.Tensor:
    """A copy of `logits` [N, V'] with the tokens `bitmask` [N, words] forbids at -inf.

    V' may differ from the vocabulary: models pad the embedding, and columns past
    `vocab_size` are never allowed in a constrained row. Rows `constrained` marks False (all
    rows are constrained by default) must have all-ones masks and come back as they were.
    """
    if logits.dim() != 2 or bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and bitmask {tuple(bitmask.shape)} "
                         f"must have the same number of rows")
    # Bit t % 32 of word t // 32 is bit t of the little-endian byte string (x86, ARM hosts):
    # numpy unpacks it in one pass, and one out-of-place where() writes the result (cheaper
    # than masked_fill_ on a copy: ~1.5 ms for 64 x 49152 on a 2-core AVX2 host).
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    allowed = torch.from_numpy(bits.view(np.bool_))
    width = logits.shape[1]
    keep = min(width, vocab_size)
    if allowed.shape[1] != width or keep < width:
        full = torch.zeros((allowed.shape[0], width), dtype=torch.bool)
        full[:, :keep] = allowed[:, :keep]
        if constrained is not None:
            free = torch.tensor([not c for c in constrained], dtype=torch.bool)
            full[free, keep:] = True
        allowed = full
    return torch.where(allowed.to(logits.device), logits,
                       torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


def apply_masks(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> torch.Tensor:
    """`logits` [N, V'] with each constrained row's disallowed tokens at -inf (a copy;
    matchers[i] None leaves row i as it was). Fill and apply in one call: the engine fills
    during the forward pass (fill_bitmasks) and applies after it (apply_bitmask)."""
    if logits.dim() != 2 or logits.shape[0] != len(matchers):
        raise ValueError(f"logits must be [N, V] with N = {len(matchers)} matchers, "
                         f"got {tuple(logits.shape)}")
    live = [(m, i, ()) for i, m in enumerate(matchers) if m is not None]
    if not live:
        return logits
    vocab = {m.vocab_size for m, _, _ in live}
    if len(vocab) > 1:
        raise ValueError(f"matchers of one batch must share a vocabulary, got sizes {vocab}")
    bitmask = allocate_bitmask(len(matchers), vocab.pop())
    fill_bitmasks(live, bitmask)
    return apply_bitmask(logits, bitmask, live[0][0].vocab_size,
                         [m is not None for m in matchers])
