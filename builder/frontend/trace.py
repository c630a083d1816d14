"""Trace an HF causal LM's stateless forward with torch.export, on the meta device.

The traced function is `(input_ids [1, T], position_ids [1, T]) -> logits [1, T, V]` with T
dynamic. Parameters live on the meta device, so tracing costs no weight memory; buffers that
the model computes at init (RoPE inverse frequencies) are computed for real and kept, since
no checkpoint holds them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from builder.errors import BuildError

MAX_TOKENS = 1 << 16


class _Forward(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


@dataclass
class Traced:
    program: torch.export.ExportedProgram
    placeholder_names: dict[str, str]  # graph placeholder -> state-dict name
    buffers: dict[str, torch.Tensor]  # state-dict name -> value computed at init
    aliases: dict[str, str]  # tied parameter name -> the name that owns it
    param_dtypes: dict[str, torch.dtype]
    architecture: str
    seconds: float
    notes: list[str] = field(default_factory=list)


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    owners: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owners:
            aliases[name] = owners[id(p)]
        else:
            owners[id(p)] = name
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict) and getattr(model.config, "tie_word_embeddings", False):
        for target, source in tied.items():
            aliases.setdefault(target, source)
    return aliases


def build_meta_model(config, dtype: torch.dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:
        arch = (config.architectures or [config.model_type])[0]
        raise BuildError(f"transformers cannot instantiate {arch}: {e}") from e
    return model.eval()


def trace_model(config, dtype: torch.dtype) -> Traced:
    start = time.perf_counter()
    model = build_meta_model(config, dtype)
    arch = type(model).__name__
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    aliases = _tied_aliases(model)
    param_dtypes = {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}
    model.to("meta")
    tokens = torch.export.Dim("T", min=1, max=MAX_TOKENS)
    # Distinct example tensors: export would merge identical inputs into one placeholder.
    ids = torch.zeros(1, 7, dtype=torch.long, device="meta")
    pos = torch.zeros(1, 7, dtype=torch.long, device="meta")
    try:
        program = torch.export.export(
            _Forward(model), (ids, pos), dynamic_shapes=({1: tokens}, {1: tokens}), strict=False
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BuildError(f"torch.export failed for {arch}: {first}") from e
    sig = program.graph_signature
    names = {}
    for ph, target in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items():
        names[ph] = target.removeprefix("m.")
    return Traced(program, names, buffers, aliases, param_dtypes, arch,
                  time.perf_counter() - start)
