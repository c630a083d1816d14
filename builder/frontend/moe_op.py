"""The experts of a mixture-of-experts block as transformers sees them: one opaque op.

transformers 5 runs MoE experts through `ExpertsInterface` (`transformers.integrations.moe`):
an experts module decorated with `use_experts_implementation` calls the function registered
under `config._experts_implementation` with the block's hidden states and the router's
choice (top-k expert indices and weights). The builder registers `llm_engine` there, so the
experts trace to one `llm_engine::moe` node instead of a data-dependent loop that
torch.export cannot follow. The router itself (linear, softmax or sigmoid, top-k,
renormalization, shared experts and their gate) is ordinary code and traces as it is.

Supported: gate and up weights concatenated or interleaved, transposed or not, with or without
biases; the default gate (act(gate) * up) with one of the reference activations, or
gpt-oss's clamped SwiGLU. Anything else (no gate, a post-expert norm, another custom gate)
fails the trace naming what the experts module uses.
"""

from __future__ import annotations

import torch

NAME = "llm_engine"
# config.hidden_act -> the activation names of kernels.ops (a closed set)
ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu",
        "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


@torch.library.custom_op("llm_engine::moe", mutates_args=())
def moe(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
        down: torch.Tensor, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
        act: str, alpha: float, limit: float) -> torch.Tensor:
    from llm_engine.kernels.ops import moe as reference

    biases = [b for b in (gate_up_bias, down_bias) if b is not None]
    return reference(x, index, weights, gate_up, down, *biases, act=act, alpha=alpha,
                     limit=limit)


@moe.register_fake
def _(x, index, weights, gate_up, down, gate_up_bias, down_bias, act, alpha, limit):
    return torch.empty_like(x)


def _unsupported(module, what: str) -> NotImplementedError:
    return NotImplementedError(f"{type(module).__name__}: experts with {what} have no "
                               "llm_engine lowering yet")


def _gate(module) -> tuple[str, float, float]:
    """(act, alpha, limit): the default gate act(gate) * up, or gpt-oss's clamped SwiGLU
    ((clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit)),
    recognized by its `alpha` and `limit` (the gate transformers' gpt-oss defines)."""
    from transformers.integrations.moe import _default_apply_gate

    if getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate:
        act = ACTS.get(str(getattr(module.config, "hidden_act", "silu")))
        if act is None:
            raise _unsupported(module, f"activation {module.config.hidden_act!r}")
        return act, 0.0, 0.0
    if isinstance(getattr(module, "alpha", None), float) and \
            isinstance(getattr(module, "limit", None), float):
        return "clamped_swiglu", module.alpha, module.limit
    raise _unsupported(module, "a custom gate")


def _forward(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts-function signature. The weights reach the op in one layout,
    [E, 2I, H] with gate and up rows interleaved (g0, u0, g1, u1, ...: what onnxruntime's
    MoE kernel reads) and [E, H, I]. Other layouts are rearranged here, as ops on the weights
    that the fold_weights pass does once at build time."""
    if not getattr(module, "has_gate", True):
        raise _unsupported(module, "no gate (up projection only)")
    if getattr(module, "has_post_expert_norm", False):
        raise _unsupported(module, "a post-expert norm")
    act, alpha, limit = _gate(module)
    gate_up, down = module.gate_up_proj, module.down_proj
    gate_up_bias = getattr(module, "gate_up_proj_bias", None) if module.has_bias else None
    down_bias = getattr(module, "down_proj_bias", None) if module.has_bias else None
    if getattr(module, "is_transposed", False):  # [E, H, 2I] and [E, I, H]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if getattr(module, "is_concatenated", True):  # gate rows, then up rows: interleave them
        gate_up = _interleave(gate_up)
        if gate_up_bias is not None:
            gate_up_bias = _interleave(gate_up_bias)
    return torch.ops.llm_engine.moe(hidden_states, top_k_index,
                                    top_k_weights.to(hidden_states.dtype), gate_up, down,
                                    gate_up_bias, down_bias, act, float(alpha), float(limit))


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] gate rows then up rows -> [E, 2I, ...] with g0, u0, g1, u1, ..."""
    half = t.shape[1] // 2
    return torch.stack([t[:, :half], t[:, half:]], dim=2).reshape(t.shape)


def register() -> str:
    """Register the engine's experts with transformers (once); returns their name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(NAME, _forward)
    return NAME
