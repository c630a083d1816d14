"""Dtype names as they appear in plans and engine.json, and their torch counterparts."""

from __future__ import annotations

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# fp8 only where this torch has it (every supported version does; the check keeps the error
# readable on an old one).
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES["float8_e4m3fn"] = torch.float8_e4m3fn
_NAMES = {v: k for k, v in _DTYPES.items()}

FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})


def to_torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported in engines") from None


def itemsize(name: str) -> int:
    return torch.empty((), dtype=to_torch_dtype(name)).element_size()
