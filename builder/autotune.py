"""Pick each GEMM kernel's tiling by timing the candidates on the build machine's GPU.

The GEMM template's tiling (block sizes, warps, pipeline stages) is a template parameter with
a small candidate list (`kernels.triton.gemm.configs`). On a CUDA build host, each candidate is
rendered, compiled and timed at the row counts an engine meets (decode, small and large
prefill), and the one with the lowest total time is recorded in the plan. Without a GPU the
template's first candidate stands and the report says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_engine.kernels.triton import gemm

ROWS = (1, 64, 512)  # decode, a small batch, a prefill chunk


def candidates(p: dict[str, Any]) -> list[dict[str, Any]]:
    """Unique tilings across the decode, batch and prefill candidate lists."""
    seen, out = set(), []
    for m in (*ROWS, None):
        for cfg in gemm.configs(m, p["N"], p["K"], "cuda", dtype=p["a_dtype"],
                                b_format=p.get("b_format", "dense"),
                                group_size=p.get("group_size")):
            key = tuple(sorted(cfg.items()))
            if key not in seen:
                seen.add(key)
                out.append(cfg)
    return out


def tune(p: dict[str, Any], time_fn: Callable[[dict[str, Any], int], float]
         ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Best tiling for params `p` by `time_fn(params, rows) -> seconds`, summed over ROWS.
    Returns the chosen params and the measurements (for the build report)."""
    table = []
    for cfg in candidates(p):
        trial = {**p, **cfg}
        try:
            total = sum(time_fn(trial, m) for m in ROWS)
        except Exception as e:  # a tiling that fails to compile (e.g. out of shared memory)
            table.append({**cfg, "error": str(e).splitlines()[0][:200]})
            continue
        table.append({**cfg, "us": round(total * 1e6, 2)})
    timed = [row for row in table if "us" in row]
    if not timed:
        return p, table
    best = min(timed, key=lambda row: row["us"])
    return {**p, **{k: best[k] for k in gemm.TILE_KEYS}}, table


def weight_operands(p: dict[str, Any], device: str = "cuda") -> list[Any]:
    """Random weight operands in the params' `b_format` (`kernels.formats`), made by the
    format's own quantizer, for timing a kernel (a calibrated part, the static fp8 activation
    scale, gets a typical value)."""
    import torch

    from llm_engine.kernels import formats

    N, K, fmt = p["N"], p["K"], formats.get(p["b_format"])
    w = torch.randn(N, K, device=device) * 0.05
    if fmt.quantize is None:
        return [w.to(getattr(torch, p["a_dtype"]))]
    parts = fmt.quantize(w, group_size=p.get("group_size"),
                         integer_zeros="zero_dtype" not in p)
    return [*parts, *(torch.full((1,), 4.0 / 448, device=device)
                      for _ in fmt.parts[len(parts):])]


def gpu_time(p: dict[str, Any], rows: int) -> float:
    """Median seconds of one launch of the rendered kernel on random inputs, on this GPU."""
    import torch
    from triton.testing import do_bench

    from llm_engine.kernels.codegen import load_kernel

    module = load_kernel(gemm.source(p))
    dtype = getattr(torch, p["a_dtype"])
    x = torch.randn(rows, p["K"], device="cuda", dtype=dtype)
    operands: list[Any] = [x, *weight_operands(p)]
    if p["bias"]:
        operands.append(torch.randn(p["N"], device="cuda", dtype=dtype))
    if p["residual"]:
        operands.append(torch.randn(rows, p["N"], device="cuda", dtype=dtype))
    return do_bench(lambda: module.launch(*operands), return_mode="median") / 1e3
