"""Checkpoint keys under the names the model's modules use, by transformers' own rules.

A Hub checkpoint's tensor names are not always the module paths of the model transformers
builds from its config: GPT-NeoX stores `embed_out.weight` for what the model calls
`lm_head.weight`, Mixtral `block_sparse_moe.` for `mlp.`, old checkpoints `LayerNorm.gamma`,
and mixture-of-experts checkpoints one tensor per expert (`experts.3.gate_proj.weight`) where
the model holds all experts in one (`experts.gate_up_proj`, [experts, 2 * inter, hidden]).
transformers resolves these in `from_pretrained` with the conversion mapping of each model
class (`transformers.conversion_mapping`); the builder applies the same renamings and
converters to the checkpoint's keys instead of keeping its own table. A merged tensor is
assembled when the writer asks for it, so the build still holds one model tensor at a time.
Of the converters' operations, the ones expert checkpoints use are supported (stacking the
experts: MergeModulelist, and concatenating gate and up: Concatenate); a checkpoint needing
another fails the build naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from llm_engine.builder.errors import BuildError


def weight_transforms_for(model: torch.nn.Module) -> list[Any]:
    """The weight transforms transformers applies when loading `model`: renamings, then
    converters (merges of several checkpoint tensors into one)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # an older transformers: checkpoint names are the module names
        return []
    return [t for t in get_model_conversion_mapping(model)
            if isinstance(t, WeightRenaming | WeightConverter)]


def _split(transforms: list[Any]) -> tuple[list[Any], list[Any]]:
    from transformers.core_model_loading import WeightRenaming

    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    return renamings, [t for t in transforms if not isinstance(t, WeightRenaming)]


@dataclass
class Merge:
    """A model tensor assembled from checkpoint tensors: per source pattern (in the
    converter's order) the keys of experts 0, 1, ..., then the converter's operations."""

    parts: list[list[str]]
    operations: list[tuple[str, int]]  # (MergeModulelist | Concatenate, dim)


def rename_keys(keys: list[str], transforms: list[Any], base_model_prefix: str | None,
                model_names: set[str]) -> tuple[dict[str, str], dict[str, Merge]]:
    """model name -> checkpoint key for the keys the renamings (or the base-model prefix
    rule) change, and model name -> Merge for tensors the converters assemble. A model name
    two keys map to keeps the first."""
    if not keys:
        return {}, {}
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _split(transforms)
    meta = dict.fromkeys(model_names)
    out: dict[str, str] = {}
    groups: dict[str, tuple[Any, dict[str, list[tuple[int, str]]]]] = {}
    for key in keys:
        if key in meta:
            continue
        new, pattern = rename_source_key(key, renamings, converters, base_model_prefix, meta)
        if pattern is not None and new in meta:
            conv = next(c for c in converters if pattern in c.source_patterns)
            index = _expert_index(pattern, key)
            groups.setdefault(new, (conv, {}))[1].setdefault(pattern, []).append((index, key))
        elif new != key and new in meta:
            out.setdefault(new, key)
    merges = {}
    for name, (conv, found) in groups.items():
        ops = []
        for op in conv.operations:
            kind = type(op).__name__
            if kind not in ("MergeModulelist", "Concatenate"):
                raise BuildError(f"{name}: transformers assembles it from the checkpoint with "
                                 f"{kind}, which the builder does not support yet")
            ops.append((kind, int(op.dim)))
        missing = [p for p in conv.source_patterns if p not in found]
        if missing:
            raise BuildError(f"{name}: the checkpoint has no tensors matching {missing[0]!r}")
        merges[name] = Merge([[k for _, k in sorted(found[p])] for p in conv.source_patterns],
                             ops)
    return out, merges


def _expert_index(pattern: str, key: str) -> int:
    """The number the pattern's `*` stands for in key (the expert)."""
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    m = re.search(regex, key)
    return int(m.group(1)) if m and m.groups() else 0


def assemble(merge: Merge, get) -> torch.Tensor:
    """The merged tensor: each pattern's experts stacked, then the patterns concatenated
    (transformers' MergeModulelist then Concatenate)."""
    parts = [[get(k) for k in keys] for keys in merge.parts]
    stacked: list[torch.Tensor] = []
    for kind, dim in merge.operations:
        if kind == "MergeModulelist":
            stacked = [torch.stack(tensors, dim=dim) for tensors in parts]
        else:
            stacked = [torch.cat(stacked or [t for ts in parts for t in ts], dim=dim)]
    if len(stacked) != 1:
        raise BuildError("a converted checkpoint tensor did not reduce to one tensor")
    return stacked[0]


class RenamedWeights:
    """A checkpoint reader that also answers to the model's names for renamed and merged
    tensors."""

    def __init__(self, reader, renamed: dict[str, str], merges: dict[str, Merge]) -> None:
        self.reader = reader
        self.renamed = renamed
        self.merges = merges

    def names(self) -> list[str]:
        return [*self.reader.names(), *self.renamed, *self.merges]

    def __contains__(self, name: str) -> bool:
        return name in self.reader or name in self.renamed or name in self.merges

    def get(self, name: str) -> torch.Tensor:
        if name in self.merges:
            return assemble(self.merges[name], self.reader.get)
        return self.reader.get(name if name in self.reader else self.renamed[name])


def checkpoint_weights(reader, traced):
    """`reader`, answering also to the model's names of the tensors transformers would
    rename or merge when loading (itself when there are none)."""
    if not traced.weight_transforms:
        return reader
    model_names = set(traced.param_dtypes) | set(traced.placeholder_names.values())
    renamed, merges = rename_keys(reader.names(), traced.weight_transforms,
                                  traced.base_model_prefix, model_names)
    return RenamedWeights(reader, renamed, merges) if renamed or merges else reader
