"""How much quantization changed the model: held-out perplexity, KL and greedy agreement,
and per-layer output error on calibration activations."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from llm_engine.builder.quant.calibrate import GraphRunner


@dataclass
class Quality:
    tokens: int  # scored next-token predictions
    window: int
    ppl_ref: float
    ppl_quant: float
    ppl_increase_pct: float
    kl: float  # mean KL(ref || quant) of next-token distributions, nats
    greedy_agreement: float  # fraction of positions whose argmax agrees

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def compare(ref: GraphRunner, quant: GraphRunner, windows: list[list[int]]) -> Quality:
    """Score each window (every token predicts the next) with both graphs."""
    nll_r = nll_q = kl = agree = 0.0
    n = 0
    for ids in windows:
        target = torch.tensor(ids[1:])
        lr = torch.log_softmax(ref.logits(ids)[:-1].double(), -1)
        lq = torch.log_softmax(quant.logits(ids)[:-1].double(), -1)
        rows = torch.arange(len(target))
        nll_r -= lr[rows, target].sum().item()
        nll_q -= lq[rows, target].sum().item()
        kl += (lr.exp() * (lr - lq)).sum(-1).sum().item()
        agree += (lr.argmax(-1) == lq.argmax(-1)).sum().item()
        n += len(target)
    ppl_r, ppl_q = math.exp(nll_r / n), math.exp(nll_q / n)
    return Quality(n, len(windows[0]), ppl_r, ppl_q, 100 * (ppl_q / ppl_r - 1), kl / n, agree / n)


def output_error(y_ref: torch.Tensor, y: torch.Tensor) -> float:
    """Relative Frobenius error of a layer's output."""
    return ((y.float() - y_ref.float()).norm() / y_ref.float().norm().clamp_min(1e-30)).item()
