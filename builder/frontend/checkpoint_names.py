"""Checkpoint keys under the names the model's modules use, by transformers' own rules.

A Hub checkpoint's tensor names are not always the module paths of the model transformers
builds from its config: GPT-NeoX stores `embed_out.weight` for what the model calls
`lm_head.weight`, Mixtral `block_sparse_moe.` for `mlp.`, old checkpoints `LayerNorm.gamma`.
transformers resolves these in `from_pretrained` with the conversion mapping of each model
class (`transformers.conversion_mapping`); the builder applies the same renamings to the
checkpoint's keys instead of keeping its own table, and still reads one tensor at a time.
"""

from __future__ import annotations

from typing import Any

import torch


def renamings_for(model: torch.nn.Module) -> list[Any]:
    """The `WeightRenaming`s transformers applies when loading `model` (converters that merge
    several tensors are not renamings and are left out here)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # an older transformers: checkpoint names are the module names
        return []
    return [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]


def rename_keys(keys: list[str], renamings: list[Any], base_model_prefix: str | None,
                model_names: set[str]) -> dict[str, str]:
    """model name -> checkpoint key, for the keys the renamings (or the base-model prefix
    rule) change. A model name two keys map to keeps the first."""
    if not keys:
        return {}
    from transformers.core_model_loading import rename_source_key

    meta = dict.fromkeys(model_names)
    out: dict[str, str] = {}
    for key in keys:
        if key in meta:
            continue
        new, _ = rename_source_key(key, renamings, [], base_model_prefix, meta)
        if new != key and new in meta:
            out.setdefault(new, key)
    return out


class RenamedWeights:
    """A checkpoint reader that also answers to the model's names for renamed tensors."""

    def __init__(self, reader, renamed: dict[str, str]) -> None:
        self.reader = reader
        self.renamed = renamed

    def names(self) -> list[str]:
        return [*self.reader.names(), *self.renamed]

    def __contains__(self, name: str) -> bool:
        return name in self.reader or name in self.renamed

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name if name in self.reader else self.renamed[name])


def checkpoint_weights(reader, traced):
    """`reader`, answering also to the model's names of the tensors transformers would
    rename when loading (itself when nothing is renamed)."""
    if not traced.renamings:
        return reader
    model_names = set(traced.param_dtypes) | set(traced.placeholder_names.values())
    renamed = rename_keys(reader.names(), traced.renamings, traced.base_model_prefix,
                          model_names)
    return RenamedWeights(reader, renamed) if renamed else reader
