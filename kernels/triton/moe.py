"""Mixture-of-experts experts block (`templates/moe.py.j2`) for the IR op `moe`: a grouped GEMM
over the tokens routed to each expert, in the style of vLLM's fused_moe.

Calling convention of a rendered module's `launch` = `kernels.ops.moe`'s:
`launch(x, index, weights, gate_up, down, gate_up_bias=None, down_bias=None, *, act,
alpha=0.0, limit=0.0)` with x [..., H], index and weights [..., k], gate_up [E, 2I, H] (gate
and up rows interleaved), down [E, H, I], and both biases [E, 2I] and [E, H] or neither.

How it runs (all without a host sync, so a decode step can be captured in a CUDA graph):
1. routing, in torch: the T*k (token, slot) pairs are sorted by expert and each expert's run
   is padded to a multiple of BLOCK_M rows, so every row block belongs to one expert; a block
   past the last expert is marked -1 and exits at once. The grid is sized by a bound on the
   block count (T*k // BLOCK_M plus one partial block per expert that has a token), not by
   the counts themselves, which live on the device;
2. launch 1, per (row block, BLOCK_N columns of I): x rows @ gate rows and @ up rows of the
   block's expert, + bias, then the gating (act(gate) * up, or gpt-oss's clamped SwiGLU),
   stored in the activation dtype (the reference's intermediate dtype too);
3. launch 2, per (row block, BLOCK_N columns of H): that intermediate @ down^T, + bias, times
   the pair's routing weight, stored in float32 per pair;
4. each token's k pair rows are summed in float32 and rounded once to the activation dtype.

Node attributes understood: `act` (one of ACTS, or "clamped_swiglu" with float `alpha` and
`limit`), `w_format` "dense" (the default). The kernel declines (the node keeps its reference
op): other activations or attributes, quantized experts (another `w_format`, or non-float
expert weights), non-float activations, an output dtype other than the input's, symbolic
expert, hidden or intermediate sizes, or a symbolic k.

Parameters: op, act (the gate activation: ACTS; "silu" for the clamped SwiGLU), clamped,
dtype, experts, hidden, inter, top_k, bias (both biases), input_precision, and the
tiling BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages. alpha and limit are not parameters:
they are launch arguments, so no float read from an engine is rendered into source.
("clamped_swiglu" is not one of the words the renderer admits, hence `clamped`.)
"""

from __future__ import annotations

import math
from typing import Any

from llm_engine.kernels import codegen
from llm_engine.kernels.triton import gated_act, is_int, next_pow2

TEMPLATE = "moe"

ACTS = gated_act.ACTS  # the gate activations; gpt-oss's CLAMPED SwiGLU besides
CLAMPED = "clamped_swiglu"
FLOATS = ("float32", "float16", "bfloat16")
INDEX_DTYPES = ("int64", "int32")


def _attrs_ok(attrs: dict[str, Any]) -> bool:
    if attrs.get("w_format", "dense") != "dense":  # quantized experts
        return False
    act, rest = attrs.get("act"), set(attrs) - {"w_format"}
    if act in ACTS:
        return rest == {"act"}
    if act != CLAMPED or rest != {"act", "alpha", "limit"}:
        return False
    return all(isinstance(attrs[k], int | float) and not isinstance(attrs[k], bool)
               and math.isfinite(attrs[k]) for k in ("alpha", "limit"))


def _sizes(shapes: list[tuple]) -> tuple[int, int, int, int] | None:
    """(experts, hidden, inter, top_k) when the operands' shapes agree, else None."""
    x, index, weights, gate_up, down = shapes[:5]
    if len(gate_up) != 3 or len(down) != 3 or not x or not index:
        return None
    E, two_i, H = gate_up
    k = index[-1]
    if not all(is_int(d) and d > 0 for d in (E, two_i, H, k)) or two_i % 2:
        return None
    inter = two_i // 2
    if x[-1] != H or tuple(down) != (E, H, inter):
        return None
    if tuple(weights) != tuple(index) or tuple(index[:-1]) != tuple(x[:-1]):
        return None
    if len(shapes) == 7 and (tuple(shapes[5]) != (E, two_i) or tuple(shapes[6]) != (E, H)):
        return None
    return E, H, inter, k


def params(op: str, attrs: dict, in_shapes: list[tuple], in_dtypes: list[str],
           out_dtype: str | list[str]) -> dict | None:
    """Template parameters for a `moe` node, or None where this family cannot run it."""
    if op != "moe" or not _attrs_ok(attrs):
        return None
    if len(in_shapes) not in (5, 7) or len(in_dtypes) != len(in_shapes):
        return None  # both biases or neither, as the op takes them
    sizes = _sizes([tuple(s) for s in in_shapes])
    if sizes is None:
        return None
    dtype = in_dtypes[0]
    if dtype not in FLOATS or out_dtype != dtype or in_dtypes[1] not in INDEX_DTYPES:
        return None
    if in_dtypes[2] not in FLOATS or any(d not in FLOATS for d in in_dtypes[3:]):
        return None  # a quantized expert format (or float64) keeps the reference
    E, H, inter, k = sizes
    clamped = attrs["act"] == CLAMPED
    p: dict[str, Any] = {
        "op": op, "act": "silu" if clamped else attrs["act"], "clamped": clamped,
        "dtype": dtype, "experts": E, "hidden": H, "inter": inter, "top_k": k,
        "bias": len(in_shapes) == 7,
        "input_precision": "ieee",
    }
    p.update(tiling(H, inter, dtype))
    return p


def tiling(hidden: int, inter: int, dtype: str) -> dict[str, int]:
    """The one tiling of both launches. It must not depend on the host: the runtime derives
    the parameters again (on whatever machine loads the engine) and requires equality.
    BLOCK_M is the largest row block; launch takes a smaller power of two when the experts get
    few rows each (decode), which pads less. Three stages of the A tile and the two B tiles
    (gate and up) take 72 KiB of shared memory for 16-bit and float32 (BLOCK_K 32) alike."""
    width = max(16, next_pow2(min(hidden, inter)))
    return {"BLOCK_M": 64, "BLOCK_N": min(64, width),
            "BLOCK_K": min(32 if dtype == "float32" else 64, width),
            "num_warps": 4, "num_stages": 3}


def source(p: dict, nodes: list[str] | None = None) -> str:
    return codegen.render(TEMPLATE, p, nodes=nodes)
