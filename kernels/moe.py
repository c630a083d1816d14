"""Reference mixture-of-experts ops: router top-k and the experts' gated MLPs.

A MoE block traces (builder/frontend/moe_op.py) to its router in ordinary ops (a linear, a
softmax or sigmoid, `topk`, `gather` of the chosen scores, renormalization) and one `moe`
node for the experts. The router's choice is data, so `moe` runs each expert on the tokens
routed to it: x [T, H], index and weights [T, k], gate_up [E, 2I, H] (gate and up rows
interleaved: g0, u0, g1, u1, ..., the layout onnxruntime's MoE kernel reads), down [E, H, I],
optional biases [E, 2I] and [E, H] -> sum over a token's k experts of
weight * down(gate(gate_up(x))). Quantized experts store each of gate_up and down as the
parts of a `kernels.formats` weight format (int8 per channel, int4 groups), experts first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def topk(x: torch.Tensor, *, k: int, dim: int = -1, largest: bool = True) -> torch.Tensor:
    """The indices of the k largest (or smallest) entries along dim, largest first; their
    values are `gather(x, topk(x))`, which is what torch.topk's values are."""
    return torch.topk(x, k, dim=dim, largest=largest).indices


def gather(x: torch.Tensor, index: torch.Tensor, *, dim: int) -> torch.Tensor:
    return torch.gather(x, dim, index)


def gate(h: torch.Tensor, *, act: str, acts: dict[str, Callable], alpha: float = 0.0,
         limit: float = 0.0) -> torch.Tensor:
    """[..., 2I] (gate and up interleaved) -> [..., I]: act(gate) * up, or gpt-oss's clamped
    SwiGLU."""
    g, up = h[..., 0::2], h[..., 1::2]
    if act == "clamped_swiglu":
        g = g.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * (g * torch.sigmoid(g * alpha))
    return acts[act](g) * up


def dense_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t().to(x.dtype)


def moe(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
        gate_up: torch.Tensor | Sequence[torch.Tensor], down: torch.Tensor | Sequence[torch.Tensor],
        gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None, *,
        act: str, acts: dict[str, Callable], alpha: float = 0.0, limit: float = 0.0,
        linear: Callable[..., torch.Tensor] = dense_linear) -> torch.Tensor:
    """`gate_up` and `down` are one tensor each, or the stored parts of a weight format (int8
    codes and scales, ...), each with experts first; `linear(x, *parts of one expert)` is
    x @ W^T for that format."""
    if x.is_meta:  # the builder's verifier checks shapes on meta tensors
        return torch.empty_like(x)
    gate_up = (gate_up,) if isinstance(gate_up, torch.Tensor) else tuple(gate_up)
    down = (down,) if isinstance(down, torch.Tensor) else tuple(down)
    flat = x.reshape(-1, x.shape[-1])
    idx = index.reshape(flat.shape[0], -1)
    w = weights.reshape(flat.shape[0], -1)
    out = torch.zeros_like(flat)
    for e in torch.unique(idx).tolist():  # only the experts some token was routed to
        tokens, slot = (idx == e).nonzero(as_tuple=True)
        h = linear(flat[tokens], *(p[e] for p in gate_up))
        if gate_up_bias is not None:
            h = h + gate_up_bias[e].to(flat.dtype)
        h = linear(gate(h, act=act, acts=acts, alpha=alpha, limit=limit),
                   *(p[e] for p in down))
        if down_bias is not None:
            h = h + down_bias[e].to(flat.dtype)
        out.index_add_(0, tokens, (h * w[tokens, slot, None]).to(out.dtype))
    return out.reshape(x.shape)


def scatter(x: torch.Tensor, index: torch.Tensor, *, dim: int, value: float) -> torch.Tensor:
    """x with `value` written at `index` along dim (group-limited routing's group mask)."""
    return x.scatter(dim, index, value)


def masked_fill(x: torch.Tensor, mask: torch.Tensor, *, value: float) -> torch.Tensor:
    return x.masked_fill(mask, value)


def logical_not(x: torch.Tensor) -> torch.Tensor:
    return torch.logical_not(x)


COMPARE = {"gt": torch.gt, "ge": torch.ge, "lt": torch.lt, "le": torch.le, "eq": torch.eq,
           "ne": torch.ne}


def compare(a: torch.Tensor, b: torch.Tensor | None = None, *, op: str,
            scalar: float | None = None) -> torch.Tensor:
    """a <op> b (or a scalar): a boolean tensor (routers' thresholds, Phi-MoE's sparsemixer)."""
    if op not in COMPARE:
        raise ValueError(f"compare: unknown op {op!r}")
    return COMPARE[op](a, b if b is not None else scalar)
