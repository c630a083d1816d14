"""Quality measurement of an engine: perplexity on a text, and agreement with a reference engine.

Used to judge quantized (or otherwise rebuilt) engines against the original. The text is cut
into fixed windows of W tokens; each window runs through the engine's plan on its own (positions
0..W-1, a private KV cache), so no token sees context from an earlier window. Within a window
every token after the first is predicted from the ones before it, so a text of n tokens in
non-overlapping windows scores n - ceil(n / W) predictions. With `stride < window` the windows
overlap (sliding-window perplexity) and each window scores only the targets the previous window
did not reach, so every target is scored once.

All log-softmax math is float32, whatever the engine's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm_engine.runtime.executor import KVCache, KVCacheSpec


@dataclass
class EvalResult:
    perplexity: float
    tokens: int  # predictions scored
    window: int
    stride: int
    nll: float  # mean negative log-likelihood per scored token (nats)
    kl: float | None = None  # mean KL(reference || engine) per scored token (nats)
    agreement: float | None = None  # fraction of positions where both argmaxes match

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"perplexity": self.perplexity, "tokens": self.tokens,
                               "window": self.window, "stride": self.stride, "nll": self.nll}
        if self.kl is not None:
            out["kl"] = self.kl
            out["agreement"] = self.agreement
        return out

    def summary(self) -> str:
        text = (f"perplexity {self.perplexity:.4f} over {self.tokens} tokens, "
                f"window {self.window}")
        if self.stride != self.window:
            text += f", stride {self.stride}"
        if self.kl is not None:
            text += f"; KL(ref || eval) {self.kl:.6f} nats/token, " \
                    f"greedy agreement {self.agreement:.4f}"
        return text


def builtin_text(n_chars: int | None = None) -> str:
    """English prose present on every Python install: the pydoc topic help texts, in sorted
    key order so the text (and thus any perplexity measured on it) is the same everywhere for
    the same Python version. `n_chars` cuts it (None: all, about 460k characters)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return text if n_chars is None else text[:n_chars]


def windows(n: int, window: int, stride: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(start, end, first_target) of each window over n tokens: the window holds tokens
    [start, end) and scores targets [first_target, end), each predicted by the token before."""
    stride = window if stride is None else stride
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    scored_to = 1  # targets below this are done (token 0 is never a target)
    start = 0
    while scored_to < n:
        end = min(start + window, n)
        first = max(scored_to, start + 1)
        if first < end:
            yield start, end, first
        scored_to = max(scored_to, end)
        start += stride


class _WindowRunner:
    """Runs one sequence of up to `window` tokens through an engine's plan, starting at
    position 0, into its own KV cache: the engine's cache (and any prefix-cached blocks a
    server may still want) is left untouched."""

    def __init__(self, engine: Any, window: int) -> None:
        if window > engine.max_seq_len:
            raise ValueError(f"window {window} is longer than the engine's max_seq_len "
                             f"{engine.max_seq_len}")
        self.engine = engine
        spec = engine.kv_spec
        self.block_size = spec.block_size
        num_blocks = -(-window // spec.block_size)
        self.cache = KVCache(KVCacheSpec(num_blocks, spec.block_size, spec.layers),
                             engine.device)
        self.device = torch.device(engine.device)

    @torch.inference_mode()
    def log_probs(self, ids: Sequence[int], rows: Sequence[int]) -> torch.Tensor:
        """float32 log-softmax [len(rows), vocab] of the next-token logits at `rows`."""
        n = len(ids)
        bs = self.block_size
        table = list(range(-(-n // bs)))  # a fresh window: blocks 0.. in order
        feeds = {
            "input_ids": torch.tensor([list(ids)]),
            "position_ids": torch.arange(n).unsqueeze(0),
            "slot_mapping": torch.tensor([table[p // bs] * bs + p % bs for p in range(n)]),
            "block_tables": torch.tensor([table], dtype=torch.int32),
            "context_lens": torch.tensor([n], dtype=torch.int32),
            "query_start_loc": torch.tensor([0, n], dtype=torch.int32),
            "logits_indices": torch.tensor(list(rows), dtype=torch.int64),
        }
        feeds = {k: v.to(self.device) for k, v in feeds.items()}
        logits = self.engine.executor.runner.run(feeds, self.cache)[0]
        logits = logits.reshape(-1, logits.shape[-1]).float()
        return torch.log_softmax(logits, dim=-1)


def _check_ids(engine: Any, ids: Sequence[int]) -> None:
    if len(ids) < 2:
        raise ValueError(f"the text is {len(ids)} token(s); perplexity needs at least 2")
    vocab = engine.vocab_size
    if vocab:
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids must be in [0, {vocab}); got {bad[:5]}")


def evaluate(engine: Any, ids: Sequence[int], window: int, stride: int | None = None,
             reference: Any = None) -> EvalResult:
    """Perplexity of `engine` on `ids`; with `reference`, also mean KL(ref || engine) of the
    next-token distributions and the greedy (argmax) agreement rate, over the same positions.
    Windows are processed one at a time, so memory is O(window x vocab)."""
    stride = window if stride is None else stride
    ids = list(ids)
    _check_ids(engine, ids)
    plan = list(windows(len(ids), window, stride))  # validates window/stride
    runner = _WindowRunner(engine, window)
    ref_runner = None
    if reference is not None:
        if reference.vocab_size != engine.vocab_size:
            raise ValueError(f"vocab mismatch: the engine has {engine.vocab_size} tokens, the "
                             f"reference {reference.vocab_size}; KL needs the same vocabulary")
        ref_runner = _WindowRunner(reference, window)
    nll = 0.0  # float64 sums: thousands of float32 terms would lose digits
    kl = 0.0
    agree = 0
    count = 0
    for start, end, first in plan:
        chunk = ids[start:end]
        rows = list(range(first - 1 - start, end - 1 - start))  # row r predicts token r + 1
        targets = torch.tensor(chunk[first - start:], device=runner.device)
        logp = runner.log_probs(chunk, rows)
        nll -= logp.gather(1, targets[:, None]).sum().item()
        count += len(rows)
        if ref_runner is not None:
            ref = ref_runner.log_probs(chunk, rows).to(logp.device)
            if ref.shape[-1] != logp.shape[-1]:
                raise ValueError(f"vocab mismatch: the engine's logits have {logp.shape[-1]} "
                                 f"columns, the reference's {ref.shape[-1]}")
            # KL(p || q) = sum p (log p - log q); p = 0 terms contribute 0 (xlogy semantics).
            kl += torch.nn.functional.kl_div(logp, ref, reduction="sum",
                                             log_target=True).item()
            agree += int((logp.argmax(-1) == ref.argmax(-1)).sum().item())
    mean_nll = nll / count
    result = EvalResult(perplexity=math.exp(mean_nll), tokens=count, window=window,
                        stride=stride, nll=mean_nll)
    if ref_runner is not None:
        result.kl = kl / count
        result.agreement = agree / count
    return result


def token_logprobs(engine: Any, ids: Sequence[int], window: int,
                   stride: int | None = None) -> torch.Tensor:
    """float32 log-probability of each scored target token, in text order (the same targets
    `perplexity` averages over: see `windows`)."""
    ids = list(ids)
    _check_ids(engine, ids)
    plan = list(windows(len(ids), window, stride))
    runner = _WindowRunner(engine, window)
    out = []
    for start, end, first in plan:
        chunk = ids[start:end]
        rows = list(range(first - 1 - start, end - 1 - start))
        targets = torch.tensor(chunk[first - start:], device=runner.device)
        out.append(runner.log_probs(chunk, rows).gather(1, targets[:, None])[:, 0].cpu())
    return torch.cat(out)


def perplexity(engine: Any, ids: Sequence[int], window: int,
               stride: int | None = None) -> float:
    """exp(mean NLL) over the targets of `windows(len(ids), window, stride)`; stride defaults
    to the window (non-overlapping windows)."""
    return evaluate(engine, ids, window, stride).perplexity
