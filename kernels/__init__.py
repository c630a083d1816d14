"""Torch reference implementations of every IR op (the oracle and the CPU path)."""

from kernels.ops import OPS, OpDef

__all__ = ["OPS", "OpDef"]
