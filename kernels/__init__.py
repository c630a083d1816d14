"""Torch reference implementations of every IR op (the oracle and the CPU path)."""

from llm_engine.kernels.ops import OPS, OpDef

__all__ = ["OPS", "OpDef"]
