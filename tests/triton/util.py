"""Helpers for kernel tests."""

from __future__ import annotations

import torch

# Relative-error bounds per dtype for a kernel against its torch reference (fp32 compute).
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so a kernel that skips an element fails the test."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: one number per comparison, robust to tiny entries."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


class PoisonedTorch:
    """Stands in for `torch` inside a rendered module: every buffer it allocates starts as
    NaN, so an element the kernel fails to write fails the test."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return poison(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return poison(torch.empty_like(*args, **kwargs))
