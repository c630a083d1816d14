"""torch's fast CPU paths for the quantized linears, their first-use checks, and the one object
that records them (`KERNELS`, a `CpuKernels`).

The linears of `kernels.quant_linear` can take faster paths on CPU than dequantizing the weight,
but only after checking them. Some paths may be missing or wrong on some machines:

* torch's packed kernels (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`,
  `torch._int_mm`) exist only in some builds. One returned garbage on one CPU for a shape that
  a check on a single shape never tried.
* the exact float32 int8 dot (`int8_dot_exact`) is exact only where float32 matmuls run at
  full precision.
* the float16 bit cast of fp8 (`fp8_div256`) depends on the bit layouts.

Each path is checked against the reference on a tiny case at first use (`CpuKernels.check`).
A packed kernel is checked again on each weight shape before it runs there
(`CpuKernels.shape_ok`). It runs only up to a row count chosen by measurement
(`KERNEL_MAX_ROWS`). `CpuKernels` holds these limits, the results of the checks and the path
each op takes (`paths`, reported by `cpu_paths()` in the engine's report.json). Keeping them in
one object, filled lazily, means importing runs no kernel, and a test or benchmark can swap in
a fresh `CpuKernels` or call `reset()`. The formats' numerics are in `kernels.quant`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F

from llm_engine.kernels.quant import (
    dequantize_int4_group,
    dequantize_int8_channel,
    quantize_int4_group,
    quantize_int8_channel,
    unpack_int4,
)

# The largest row count (tokens) for which an op uses torch's packed CPU kernel rather than its
# dequantizing path; 0: never. Chosen by measurement (torch 2.13, 1 thread, an AVX2 x86 CPU,
# SmolLM2-135M's weights: N x K = 960 x 576, 576 x 576, 3072 x 576, 576 x 1536, 49152 x 576):
# every kernel lost at every shape. At M = 1 row, `_weight_int4pack_mm_for_cpu` (its pack
# cached) took 0.9-2.0x the time of the dequantizing path, `_weight_int8pack_mm` 2.2-2.5x,
# `_int_mm` 1.3-2.1x the exact float32 path; at M = 64, 43-66x, 26-30x and 15-18x (the kernels'
# time grows with the rows, a dequantized block of weight rows serves them all). A CPU where a
# kernel wins (their AVX-512 / AMX builds) can raise its limit: the kernels stay verified at
# first use and tested.
# (The defaults, read-only: a process raises a limit in `KERNELS.max_rows`.)
KERNEL_MAX_ROWS = MappingProxyType({"int8_linear": 0, "int4_linear": 0, "int8_a8_linear": 0})

# torch's CPU int4 kernel only takes these group sizes and N a multiple of 16
# (`_weight_int4pack_mm_cpu` / `_convert_weight_to_int4pack_cpu` checks in torch 2.13).
_INT4PACK_GROUPS = (32, 64, 128, 256)
_INT4PACK_N_MULTIPLE = 16
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

DEQUANTIZE = "dequantize+linear"
# Weight elements dequantized at a time on CPU (2 MiB of float32): a whole dequantized LM head
# (49152 x 576 fp32, 113 MB) is a fresh allocation that page-faults on every call, 10x slower
# than dequantizing it in cache-sized row blocks, each consumed by F.linear at once.
_CHUNK_ELEMENTS = 1 << 19
# 1024 * 127 * 127 < 2**24: a float32 dot of at most this many int8 x int8 products is exact
# (every partial sum is an integer float32 represents), whatever the summation order.
_EXACT_K = 1024

# A torch kernel runs a weight shape only when K is a multiple of this and the kernel agreed
# with the dequantizing path on that very shape (`CpuKernels.shape_ok`). On an AVX-512/VNNI CPU
# `torch._int_mm` returned 1.39e5 for a 1 x 1 @ 1 x 2 product whose exact value is 0 (its
# blocked loops read past a K that is not a multiple of their step), while the tiny probe
# shape agreed: a check on one shape says nothing about another. Model layers are multiples
# of 64 wide.
_KERNEL_K_MULTIPLE = 16

# The ops whose CPU path `cpu_paths` reports, and the torch kernel of those that have one.
OPS = ("int8_linear", "int4_linear", "int8_a8_linear", "fp8_a8_linear", "fp8_a8_token_linear",
       "fp8_a8_group_linear")
_KERNELS = {"int8_linear": "torch._weight_int8pack_mm",
            "int4_linear": "torch._weight_int4pack_mm_for_cpu",
            "int8_a8_linear": "torch._int_mm"}


@dataclass
class CpuKernels:
    """What this process knows about the CPU paths. It is filled at first use, so a fresh one
    knows nothing yet and runs no kernel.

    `max_rows`: op -> the most rows for which it takes torch's kernel (`KERNEL_MAX_ROWS`).
    `paths`: op -> the path it takes on CPU ("dequantize+linear", "torch._weight_int8pack_mm
    (<= 4 rows, ...), else dequantize+linear", ...), recorded at its first call (`record`).
    `verified`: check (an op with a kernel, "int8_a8_exact", "fp8_bits") -> its probe passed.
    `shape_verified`: (op, N, K, dtype, row class) -> the kernel agreed on that weight shape.
    """

    max_rows: dict[str, int] = field(default_factory=lambda: dict(KERNEL_MAX_ROWS))
    paths: dict[str, str] = field(default_factory=dict)
    verified: dict[str, bool] = field(default_factory=dict)
    shape_verified: dict[tuple, bool] = field(default_factory=dict)

    def reset(self) -> None:
        """Forgets every check and recorded path (they run again at next use); keeps
        `max_rows`, which is configuration rather than something learned."""
        self.paths.clear()
        self.verified.clear()
        self.shape_verified.clear()

    def check(self, name: str) -> bool:
        """Runs the probe of `name` once (a probe that raises fails)."""
        if name not in self.verified:
            try:
                self.verified[name] = bool(_PROBES[name]())
            except (RuntimeError, NotImplementedError, TypeError):
                self.verified[name] = False
        return self.verified[name]

    def use_kernel(self, op: str, x2: torch.Tensor, N: int) -> bool:
        """Whether `op` runs torch's kernel on x2 [M, K] against an [N, K] weight."""
        rows, K = x2.shape
        limit = self.max_rows.get(op, 0)
        return (x2.device.type == "cpu" and x2.dtype in _FLOATS and 0 < rows <= limit
                and K % _KERNEL_K_MULTIPLE == 0 and self.check(op)
                and self.shape_ok(op, N, K, x2.dtype, min(rows, limit)))

    def shape_ok(self, op: str, N: int, K: int, dtype: torch.dtype, rows: int) -> bool:
        """Runs torch's kernel for `op` on random operands of this weight shape, at 1 row and at
        `rows` rows (the size class of the call: the kernels switch loops by row count), against
        the path used otherwise; cached per (op, N, K, dtype, row class)."""
        row_class = 1 if rows == 1 else 2 if rows <= 4 else 3
        key = (op, N, K, dtype, row_class)
        if key not in self.shape_verified:
            gen = torch.Generator().manual_seed(N * 7919 + K)
            try:
                self.shape_verified[key] = all(_SHAPE_CHECKS[op](N, K, dtype, m, gen)
                                               for m in sorted({1, rows}))
            except (RuntimeError, NotImplementedError, TypeError):
                self.shape_verified[key] = False
        return self.shape_verified[key]

    def fallback(self, op: str) -> str:
        """The path `op` takes when it does not run torch's kernel."""
        if op == "int8_a8_linear":
            return "exact float32 linear" if self.check("int8_a8_exact") else "float64 reference"
        if op in ("fp8_a8_linear", "fp8_a8_token_linear", "fp8_a8_group_linear"):
            return DEQUANTIZE + (" (float16 bit cast)" if self.check("fp8_bits") else "")
        return DEQUANTIZE

    def record(self, op: str) -> None:
        """Sets paths[op] (once; `cpu_paths` refreshes it) to the path `op` takes on CPU."""
        if op in self.paths:
            return
        limit = self.max_rows.get(op, 0)
        if limit > 0 and self.check(op):
            self.paths[op] = (f"{_KERNELS[op]} (<= {limit} rows, on weight shapes it verifies "
                              f"on), else {self.fallback(op)}")
        else:
            self.paths[op] = self.fallback(op)

    def cpu_paths(self) -> dict[str, str]:
        """Runs the first-use checks the paths need now and returns the path each op takes on
        CPU (a copy of `paths`)."""
        for op in OPS:
            self.paths.pop(op, None)
            self.record(op)
        return dict(self.paths)


# The process's state; the ops read it as `cpu_kernels.KERNELS` at each call, so a test can swap
# in a fresh one.
KERNELS = CpuKernels()


def cpu_paths() -> dict[str, str]:
    """`KERNELS.cpu_paths()`: the path each quantized linear takes on CPU, checks run now."""
    return KERNELS.cpu_paths()


# ---------------------------------------------------------------------------------------------
# The paths
# ---------------------------------------------------------------------------------------------


def rows_linear(x2: torch.Tensor, N: int, rows, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K] @ W^T (+ bias) -> [M, N] in x2's dtype, where `rows(i, j)` returns W[i:j] in
    x2's dtype. On CPU, W is produced and used `_CHUNK_ELEMENTS` at a time (see there)."""
    K = x2.shape[-1]
    step = N if x2.device.type != "cpu" else max(1, _CHUNK_ELEMENTS // max(K, 1))
    if step >= N:
        return F.linear(x2, rows(0, N), bias)
    y = torch.empty(x2.shape[0], N, dtype=x2.dtype, device=x2.device)
    for i in range(0, N, step):
        j = min(N, i + step)
        y[:, i:j] = F.linear(x2, rows(i, j), None if bias is None else bias[i:j])
    return y


def int8_kernel(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The kernel wants the scales in the activation dtype.
    return torch._weight_int8pack_mm(x2, q, scale.to(x2.dtype))


# id(packed) -> (weakref to it, stamp, torch's int4 pack, {dtype: scales_and_zeros}): the pack
# `_weight_int4pack_mm_for_cpu` needs, converted once per weight rather than on every call. The
# stamp (storage, version counter, shape of packed / scales / zeros, group size) catches a
# weight modified in place or a new tensor at a recycled id; the weakref's callback drops the
# entry when the weight is freed.
_INT4_PACKS: dict[int, tuple] = {}


def _stamp(*ts: torch.Tensor) -> tuple:
    # (An inference-mode tensor has no version counter; it cannot change outside that mode.)
    return tuple((t.data_ptr(), None if t.is_inference() else t._version, tuple(t.shape),
                  t.dtype) for t in ts)


def _int4_pack(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4 pack, scales_and_zeros in `dtype`) for torch's CPU int4 kernel, cached per weight.

    torch's kernel computes W = (q - 8) * s + zf with a float zero zf per group, and takes the
    unpacked q as int32 [N, K] (it repacks into its own tiled layout). Ours is W = (q - z) * s,
    so zf = (8 - z) * s. Scales and zeros go as [K // G, N, 2] in x's dtype."""
    key = id(packed)
    stamp = (_stamp(packed, scales, zeros), group_size)
    entry = _INT4_PACKS.get(key)
    if entry is None or entry[0]() is not packed or entry[1] != stamp:
        q = unpack_int4(packed).to(torch.int32)
        pack = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        ref = weakref.ref(packed, lambda _, key=key: _INT4_PACKS.pop(key, None))
        entry = (ref, stamp, pack, {})
        _INT4_PACKS[key] = entry
    by_dtype = entry[3]
    if dtype not in by_dtype:
        s = scales.float()
        zf = (8.0 - zeros.float()) * s
        by_dtype[dtype] = torch.stack((s.t(), zf.t()), dim=-1).contiguous().to(dtype)
    return entry[2], by_dtype[dtype]


def int4_kernel(
    x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    pack, sz = _int4_pack(packed, scales, zeros, group_size, x2.dtype)
    return torch._weight_int4pack_mm_for_cpu(x2, pack, group_size, sz)


def int4_kernel_supports(N: int, group_size: int) -> bool:
    """Whether torch's CPU int4 kernel takes this shape (else int4_linear dequantizes)."""
    return N % _INT4PACK_N_MULTIPLE == 0 and group_size in _INT4PACK_GROUPS


def int8_dot_exact(xq: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """xq int8 [M, K] @ q int8 [N, K]^T as exact integers, float64 [M, N]: float32 dots of at
    most `_EXACT_K` products (exact, see there), summed in float64 (exact too)."""
    M, K = xq.shape
    xf = xq.float()
    acc = torch.zeros(M, q.shape[0], dtype=torch.float64, device=xq.device)
    for k0 in range(0, K, _EXACT_K):
        k1 = min(K, k0 + _EXACT_K)
        qk = q[:, k0:k1]
        acc += rows_linear(xf[:, k0:k1], q.shape[0], lambda i, j, qk=qk: qk[i:j].float())
    return acc


def fp8_div256(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32 values / 256, exactly, about 10x faster than q.float() on CPU
    (which converts in software). The e4m3 bits s eeee mmm shifted left by 7 are the float16
    s 0eeee mmm0000000: the same digits with float16's exponent bias (15 vs 7), i.e. the value
    times 2**-8, subnormals included; float16 -> float32 is a hardware conversion. (As int16 the
    byte is sign-extended; bit 14 gets a copy of the sign and is cleared.) NaN (never stored: the
    quantizers clamp) would come out finite."""
    h = q.view(torch.int8).to(torch.int16)
    return h.bitwise_left_shift_(7).bitwise_and_(-16385).view(torch.float16).float()


# ---------------------------------------------------------------------------------------------
# First-use checks: on a tiny case (probes), then per weight shape (shape checks)
# ---------------------------------------------------------------------------------------------


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # The probes run in fp32, where a correct kernel differs only by summation order.
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def _probe_int8() -> bool:
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 24, generator=gen)
    x = torch.randn(3, 24, generator=gen)
    q, s = quantize_int8_channel(w)
    return _close(int8_kernel(x, q, s), F.linear(x, dequantize_int8_channel(q, s)))


def _probe_int4() -> bool:
    if not (hasattr(torch, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")):
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen)
    x = torch.randn(3, 64, generator=gen)
    p, s, z = quantize_int4_group(w, 32)
    return _close(int4_kernel(x, p, s, z, 32), F.linear(x, dequantize_int4_group(p, s, z, 32)))


def _probe_int_mm() -> bool:
    return hasattr(torch, "_int_mm") and _check_int_mm_shape(
        5, 24, torch.float32, 3, torch.Generator().manual_seed(0))


def _probe_int8_exact() -> bool:
    # The worst case for exactness (every product 127 * 127, K = _EXACT_K, so the sums reach
    # 2**24 - 2**18) and a random one, against integer arithmetic. Fails where float32 matmuls
    # are computed in reduced precision (e.g. torch.set_float32_matmul_precision on some CPUs).
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.full((2, _EXACT_K), 127, dtype=torch.int8),
              torch.full((3, _EXACT_K), -127, dtype=torch.int8)),
             (torch.randint(-127, 128, (3, 1100), generator=gen, dtype=torch.int8),
              torch.randint(-127, 128, (5, 1100), generator=gen, dtype=torch.int8))]
    return all(torch.equal(int8_dot_exact(a, b), (a.long() @ b.long().t()).double())
               for a, b in cases)


def _probe_fp8_bits() -> bool:
    if not hasattr(torch, "float8_e4m3fn"):
        return False
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    want = every.float()
    finite = ~want.isnan()
    return torch.equal((fp8_div256(every) * 256.0)[finite], want[finite])


# check name -> probe: does the fast path exist here and agree with the reference?
_PROBES = {
    "int8_linear": _probe_int8,
    "int4_linear": _probe_int4,
    "int8_a8_linear": _probe_int_mm,
    "int8_a8_exact": _probe_int8_exact,
    "fp8_bits": _probe_fp8_bits,
}


def _check_int8_shape(N: int, K: int, dtype: torch.dtype, M: int, gen) -> bool:
    q, s = quantize_int8_channel(torch.randn(N, K, generator=gen))
    x = torch.randn(M, K, generator=gen).to(dtype)
    return _agrees(int8_kernel(x, q, s), x, dequantize_int8_channel(q, s))


def _check_int4_shape(N: int, K: int, dtype: torch.dtype, M: int, gen) -> bool:
    G = next(g for g in reversed(_INT4PACK_GROUPS) if K % g == 0)
    p, s, z = quantize_int4_group(torch.randn(N, K, generator=gen), G)
    x = torch.randn(M, K, generator=gen).to(dtype)
    return _agrees(int4_kernel(x, p, s, z, G), x, dequantize_int4_group(p, s, z, G))


def _check_int_mm_shape(N: int, K: int, dtype: torch.dtype, M: int, gen) -> bool:
    a = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    return torch.equal(torch._int_mm(a, b.t()), (a.long() @ b.long().t()).int())


def _agrees(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    """y = x @ w^T up to a few roundings of x's dtype per product and per sum: a correct kernel
    differs by summation order and precision; a wrong one (garbage, a skipped block) by far more."""
    eps = 8 * torch.finfo(x.dtype).eps
    bound = eps * (x.float().abs() @ w.float().abs().t()) + eps
    return y.shape == (x.shape[0], w.shape[0]) and bool(
        ((y.float() - x.float() @ w.float().t()).abs() <= bound).all())


_SHAPE_CHECKS = {"int8_linear": _check_int8_shape, "int4_linear": _check_int4_shape,
                 "int8_a8_linear": _check_int_mm_shape}
