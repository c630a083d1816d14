"""The engine's attention as transformers sees it: one opaque op in the traced graph.

transformers 5 calls attention through `AttentionInterface`: each model's attention module
hands the registered function its query, key and value and its variant as keyword arguments
(scale, logit soft-cap, sliding window, sinks). The builder registers `llm_engine` there and
traces with it, so every architecture's attention is one `llm_engine::attention` node
carrying its variant, whatever eager code the model would otherwise run, and models that
refuse `sdpa` (Gemma 2's soft-cap) trace like the rest. The mask HF builds is an operand,
folded by lower_aten like sdpa's (it must be causal or a sliding window).

The op's own implementation is plain torch (the meaning the lowering must keep); at build
time it only runs under torch.export's fake tensors.
"""

from __future__ import annotations

import math

import torch

NAME = "llm_engine"


@torch.library.custom_op("llm_engine::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              sinks: torch.Tensor | None, scale: float, softcap: float) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, H, T, Dv]. `mask`: additive or boolean,
    broadcastable to [B, H, T, S]; `softcap` 0 for none; `sinks` [H], one extra logit per
    head that takes softmax mass and contributes no value (gpt-oss)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask.float())
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs.to(v.dtype) @ v).contiguous()


@attention.register_fake
def _(q, k, v, mask, sinks, scale, softcap):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


def _forward(module, query, key, value, attention_mask, dropout: float = 0.0,
             scaling: float | None = None, softcap: float | None = None,
             s_aux: torch.Tensor | None = None, **kwargs):
    """transformers' attention-function signature; returns ([B, T, H, Dv], None)."""
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("attention with an additive position bias (ALiBi)")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    mask = attention_mask
    if mask is not None and mask.shape[-1] != key.shape[-2]:
        mask = mask[..., : key.shape[-2]]
    out = torch.ops.llm_engine.attention(query, key, value, mask, s_aux, float(scale),
                                         float(softcap or 0.0))
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the engine's attention with transformers (once); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _forward)
    try:  # masks built as for sdpa (boolean, causal / sliding), which lower_aten folds
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    except ImportError:
        pass
    return NAME
