"""Orthogonal matrices for the rotation pass: normalized Hadamard matrices where one of order n
can be built (Sylvester doubling times a Paley factor), a seeded random orthogonal otherwise.

A Hadamard matrix spreads every input channel evenly over all outputs (|H_ij| = 1/sqrt(n)), so
a channel with 100x the typical magnitude becomes a 1/sqrt(n) share in every channel: the
property that makes rotated activations and weights easy to quantize (QuIP, QuaRot)."""

from __future__ import annotations

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = chi(j - i) over GF(q), chi the quadratic character."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 (mod 4)."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q = 1 (mod 4)."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    one = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    out = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            out[2 * i:2 * i + 2, 2 * j:2 * j + 2] = zero if c[i, j] == 0 else c[i, j] * one
    return out


def _base(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n from one Paley construction, or None."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley1(n - 1)
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return _paley2(n // 2 - 1)
    return None


def hadamard_pm1(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n (H Hᵀ = n I) as Kronecker products of Sylvester's 2 and
    Paley factors, or None where this construction has none (n odd > 2, for instance)."""
    if n < 1:
        return None
    base = _base(n)
    if base is not None:
        return base
    for f in range(2, n):
        if n % f:
            continue
        a = _base(f)
        if a is None:
            continue
        rest = hadamard_pm1(n // f)
        if rest is not None:
            return torch.kron(a, rest)
    return None


def rotation_matrix(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """An n x n orthogonal matrix (float64) and its kind: a Hadamard matrix with random signs
    on its rows (D H / sqrt(n)) where one exists, else a random orthogonal (QR of a Gaussian)."""
    gen = torch.Generator().manual_seed(seed)
    h = hadamard_pm1(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        return signs[:, None] * h / n ** 0.5, "hadamard"
    g = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :], "random"
