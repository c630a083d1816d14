"""Reference mixture-of-experts ops: router top-k and the experts' gated MLPs.

A MoE block traces (builder/frontend/moe_op.py) to its router in ordinary ops (a linear, a
softmax or sigmoid, `topk`, `gather` of the chosen scores, renormalization) and one `moe`
node for the experts. The router's choice is data, so `moe` runs each expert on the tokens
routed to it: x [T, H], index and weights [T, k], gate_up [E, 2I, H] (gate rows first),
down [E, H, I] -> sum over a token's k experts of weight * down(act(gate) * up).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def topk(x: torch.Tensor, *, k: int, dim: int = -1, largest: bool = True) -> torch.Tensor:
    """The indices of the k largest (or smallest) entries along dim, largest first; their
    values are `gather(x, topk(x))`, which is what torch.topk's values are."""
    return torch.topk(x, k, dim=dim, largest=largest).indices


def gather(x: torch.Tensor, index: torch.Tensor, *, dim: int) -> torch.Tensor:
    return torch.gather(x, dim, index)


def moe(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
        down: torch.Tensor, *, act: str, acts: dict[str, Callable]) -> torch.Tensor:
    if x.is_meta:  # the builder's verifier checks shapes on meta tensors
        return torch.empty_like(x)
    flat = x.reshape(-1, x.shape[-1])
    idx = index.reshape(flat.shape[0], -1)
    w = weights.reshape(flat.shape[0], -1)
    out = torch.zeros_like(flat)
    fn = acts[act]
    for e in torch.unique(idx).tolist():  # only the experts some token was routed to
        tokens, slot = (idx == e).nonzero(as_tuple=True)
        gate, up = (flat[tokens] @ gate_up[e].t().to(flat.dtype)).chunk(2, dim=-1)
        h = (fn(gate) * up) @ down[e].t().to(flat.dtype)
        out.index_add_(0, tokens, (h * w[tokens, slot, None]).to(out.dtype))
    return out.reshape(x.shape)
