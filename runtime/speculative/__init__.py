"""Speculative decoding: proposers (prompt lookup, a draft engine), verification inside the
paged batch, and the policy that decides K per request and step."""

from llm_engine.runtime.speculative.speculator import (
    METHODS,
    SpecState,
    SpecStats,
    SpeculativeConfig,
    Speculator,
)

__all__ = ["METHODS", "SpecState", "SpecStats", "SpeculativeConfig", "Speculator"]
