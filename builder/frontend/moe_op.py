"""The experts of a mixture-of-experts block as transformers sees them: one opaque op.

transformers 5 runs MoE experts through `ExpertsInterface` (`transformers.integrations.moe`):
an experts module decorated with `use_experts_implementation` calls the function registered
under `config._experts_implementation` with the block's hidden states and the router's
choice (top-k expert indices and weights). The builder registers `llm_engine` there, so the
experts trace to one `llm_engine::moe` node instead of a data-dependent loop that
torch.export cannot follow. The router itself (linear, softmax or sigmoid, top-k,
renormalization, shared experts and their gate) is ordinary code and traces as it is.

Supported: concatenated [gate; up] weights, not transposed, no biases, no post-expert norm,
the default gate (act(gate) * up) with one of the reference activations. Anything else fails
the trace naming what the experts module uses.
"""

from __future__ import annotations

import torch

NAME = "llm_engine"
# config.hidden_act -> the activation names of kernels.ops (a closed set)
ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu",
        "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


@torch.library.custom_op("llm_engine::moe", mutates_args=())
def moe(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
        down: torch.Tensor, act: str) -> torch.Tensor:
    from llm_engine.kernels.ops import moe as reference

    return reference(x, index, weights, gate_up, down, act=act)


@moe.register_fake
def _(x, index, weights, gate_up, down, act):
    return torch.empty_like(x)


def _unsupported(module, what: str) -> NotImplementedError:
    return NotImplementedError(f"{type(module).__name__}: experts with {what} have no "
                               "llm_engine lowering yet")


def _forward(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts-function signature."""
    from transformers.integrations.moe import _default_apply_gate

    if not getattr(module, "has_gate", True) or not getattr(module, "is_concatenated", True):
        raise _unsupported(module, "separate or interleaved gate/up weights")
    if getattr(module, "is_transposed", False):
        raise _unsupported(module, "transposed weights")
    if getattr(module, "has_bias", False):
        raise _unsupported(module, "biases")
    if getattr(module, "has_post_expert_norm", False):
        raise _unsupported(module, "a post-expert norm")
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        raise _unsupported(module, "a custom gate (e.g. a clamped SwiGLU)")
    act = ACTS.get(str(getattr(module.config, "hidden_act", "silu")))
    if act is None:
        raise _unsupported(module, f"activation {module.config.hidden_act!r}")
    return torch.ops.llm_engine.moe(hidden_states, top_k_index, top_k_weights.to(
        hidden_states.dtype), module.gate_up_proj, module.down_proj, act)


def register() -> str:
    """Register the engine's experts with transformers (once); returns their name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(NAME, _forward)
    return NAME
