"""Triton kernel families: each module renders its template for given parameters and launches
the kernel with the same calling convention as the torch reference op in `kernels/ops.py`."""

import math


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes must be powers of 2."""
    return 1 << max(n - 1, 0).bit_length()


def is_int(d) -> bool:
    """A static size: an int, not a bool and not a symbolic dimension such as "T"."""
    return isinstance(d, int) and not isinstance(d, bool)


def static_numel(dims) -> int | None:
    """The product of `dims`, or None when any of them is symbolic."""
    return math.prod(dims) if all(is_int(d) for d in dims) else None


def row_num_warps(block: int) -> int:
    """Warps for a one-program-per-row kernel over `block` columns (gated_act, embedding)."""
    return 4 if block >= 1024 else 2 if block >= 512 else 1
