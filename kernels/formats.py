"""Weight formats: how a `linear` node's weight is stored, one value per format.

A plan's `linear` node names its format in the `b_format` attribute; everything that depends on
the format reads it from here: the torch reference (`kernels.ops.linear`), the quantize pass
(what to store under which weight names), the tensor-parallel partitioner (how a split cuts
each stored part), the Triton GEMM checker and the ONNX exporter (which register their
lowerings against these names; a test checks that every format has one of each). The numerics
themselves are in `kernels.quant`, the torch linears in `kernels.quant_linear`. Adding a format
is one entry here, its kernels and one test file.

Weights are in torch's linear layout, W [N, K] (N output channels, K input channels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_engine.kernels import quant as Q
from llm_engine.kernels import quant_linear as QL


@dataclass(frozen=True)
class Part:
    """One stored tensor of a format, in the node's operand order.

    `suffix`: its weight name is `<original weight name>.<suffix>` ("" keeps the name).
    `rows`: dim 0 runs over output channels (a column-parallel split takes its rows).
    `cols`: what dim 1 runs over, for a row-parallel split of the input channels: "channel"
    (one per input channel), "pair" (two 4-bit channels per byte), "group" (one per group of
    `group_size` channels), or None (no such dim: every shard keeps it whole)."""

    suffix: str
    rows: bool = True
    cols: str | None = None


@dataclass(frozen=True)
class WeightFormat:
    name: str
    parts: tuple[Part, ...]
    # x's quantization before the product: "" (none: weight-only), "int8 per token",
    # "fp8 per tensor (static)", "fp8 per token", "fp8 per token and group"
    activations: str
    grouped: bool  # the node carries a `group_size` attribute
    # (x, *parts, group_size, bias) -> x @ W^T (+ bias): the torch reference
    linear: Callable[..., torch.Tensor]
    # (*parts, group_size) -> W float32 [N, K]
    dequantize: Callable[..., torch.Tensor]
    # (W [N, K], group_size, integer_zeros) -> the parts a quantizer makes from W alone (a
    # format's calibrated parts, e.g. a static activation scale, follow them); None: dense
    quantize: Callable[..., list[torch.Tensor]] | None = None

    @property
    def operands(self) -> int:
        return len(self.parts)

    @property
    def channels_per_col(self) -> int:
        """Input channels per element of the first part's dim 1 (2 for packed int4)."""
        return 2 if self.parts[0].cols == "pair" else 1


def _dense_linear(x, w, *, group_size=None, bias=None):
    return F.linear(x, w, bias)


def _fp8_channel(w, group_size=None, integer_zeros=False):
    return list(Q.quantize_fp8_channel(w))


def _int8_channel(w, group_size=None, integer_zeros=False):
    return list(Q.quantize_int8_channel(w))


_INT8 = (Part("int8", cols="channel"), Part("scale"))
_FP8 = (Part("fp8", cols="channel"), Part("scale"))

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("dense", (Part("", cols="channel"),), "", False, _dense_linear,
                 lambda w, group_size=None: w.float()),
    WeightFormat("int8_channel", _INT8, "", False,
                 lambda x, q, s, group_size=None, bias=None: QL.int8_linear(x, q, s, bias),
                 lambda q, s, group_size=None: Q.dequantize_int8_channel(q, s), _int8_channel),
    WeightFormat("int4_group", (Part("int4", cols="pair"), Part("scales", cols="group"),
                                Part("zeros", cols="group")), "", True,
                 lambda x, q, s, z, group_size=None, bias=None:
                 QL.int4_linear(x, q, s, z, group_size, bias),
                 lambda q, s, z, group_size=None: Q.dequantize_int4_group(q, s, z, group_size),
                 lambda w, group_size=None, integer_zeros=False:
                 list(Q.quantize_int4_group(w, group_size, integer_zeros))),
    WeightFormat("int8_channel_a8", _INT8, "int8 per token", False,
                 lambda x, q, s, group_size=None, bias=None: QL.int8_a8_linear(x, q, s, bias),
                 lambda q, s, group_size=None: Q.dequantize_int8_channel(q, s), _int8_channel),
    WeightFormat("fp8_channel_a8", (*_FP8, Part("x_scale", rows=False)),
                 "fp8 per tensor (static)", False,
                 lambda x, q, s, xs, group_size=None, bias=None:
                 QL.fp8_a8_linear(x, q, s, xs, bias),
                 lambda q, s, xs=None, group_size=None: Q.dequantize_fp8_channel(q, s),
                 _fp8_channel),
    WeightFormat("fp8_channel_a8_token", _FP8, "fp8 per token", False,
                 lambda x, q, s, group_size=None, bias=None:
                 QL.fp8_a8_token_linear(x, q, s, bias),
                 lambda q, s, group_size=None: Q.dequantize_fp8_channel(q, s), _fp8_channel),
    WeightFormat("fp8_channel_a8_group", _FP8, "fp8 per token and group", True,
                 lambda x, q, s, group_size=None, bias=None:
                 QL.fp8_a8_group_linear(x, q, s, group_size, bias),
                 lambda q, s, group_size=None: Q.dequantize_fp8_channel(q, s), _fp8_channel),
)}


GROUPED = tuple(name for name, f in FORMATS.items() if f.grouped)  # with a group_size attr


def get(name: str) -> WeightFormat:
    """The format a node's `b_format` names; ValueError naming the known ones otherwise."""
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"unknown weight format {str(name)[:40]!r}; known: "
                         f"{', '.join(FORMATS)}")
    return fmt


def of(attrs: dict) -> WeightFormat:
    """The weight format of a `linear` node's attributes (dense when it names none)."""
    return get(attrs.get("b_format", "dense"))
