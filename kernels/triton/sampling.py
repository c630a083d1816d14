"""Sampling kernels (`templates/sampling.py.j2`): fused passes over the vocabulary.

Two kernels, one program per row of logits [..., V], the vocabulary streamed in BLOCK_V
chunks (so any V fits, and a row is read once):

* `argmax`: greedy decoding. `launch(logits)` == `torch.argmax(logits, dim=-1)` (int64 ids;
  the first index on ties and a NaN ranks above everything, like torch).
* `softmax_topk`: `launch(logits, temperature=1.0, k=k)` == `softmax_topk_reference`:
  `torch.softmax(logits.float() / temperature, -1).topk(k)`, i.e. (probs float32 [..., k],
  ids int64 [..., k]), largest first, from an online (running max / running sum) softmax
  fused with a running top-k. `temperature` > 0 is a float or a tensor with one value per
  row; ties between equal logits go to the lower index.

`params(op, attrs, in_shapes, in_dtypes, out_dtype)` accepts these node forms (they are not
IR ops of `kernels.ops`; a sampling stage may emit them):
  op "argmax",       attrs {} or {"dim": -1}, inputs [logits],              out int64
  op "softmax_topk", attrs {"k": k},          inputs [logits(, temperature)], out float32
                                                (outputs: probs float32, ids int64)
`argmax(logits)` and `softmax_topk(logits, temperature, k)` render, load (cached) and launch.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from llm_engine.kernels import codegen
from llm_engine.kernels.dtypes import dtype_name
from llm_engine.kernels.triton import next_pow2

TEMPLATE = "sampling"

FLOATS = ("float32", "float16", "bfloat16")
MAX_K = 1024  # the running top-k lives in registers



def block_v(V: int, k: int = 1, device: str = "cpu") -> int:
    """Chunk size: 4096 on a GPU (2048 with a top-k merge), 16384 under the interpreter
    (fewer, larger numpy steps), never much past V and never below the padded k."""
    cap = 16384 if device != "cuda" else (2048 if k > 1 else 4096)
    return max(min(cap, next_pow2(V)), next_pow2(k), 16)


def params(op: str, attrs: dict, in_shapes: list[tuple], in_dtypes: list[str],
           out_dtype: str) -> dict | None:
    if not in_shapes or not in_dtypes:
        return None
    shape, dtype = tuple(in_shapes[0]), in_dtypes[0]
    if dtype not in FLOATS or not shape or not isinstance(shape[-1], int) \
            or isinstance(shape[-1], bool) or shape[-1] < 1:
        return None
    V = shape[-1]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if op == "argmax":
        if len(in_shapes) != 1 or out_dtype != "int64" \
                or set(attrs) - {"dim"} or attrs.get("dim", -1) not in (-1, len(shape) - 1):
            return None
        return {"kind": "argmax", "V": V, "dtype": dtype, "BLOCK_V": block_v(V, 1, device),
                "num_warps": 8 if device == "cuda" else 4}
    if op == "softmax_topk":
        k = attrs.get("k")
        if set(attrs) != {"k"} or not isinstance(k, int) or isinstance(k, bool) \
                or not 1 <= k <= min(V, MAX_K) or len(in_shapes) not in (1, 2) \
                or out_dtype != "float32":
            return None
        return {"kind": "softmax_topk", "V": V, "dtype": dtype, "k": k,
                "BLOCK_V": block_v(V, k, device), "num_warps": 8 if device == "cuda" else 4}
    return None


def source(p: dict, nodes: list[str] | None = None) -> str:
    return codegen.render(TEMPLATE, p, nodes=nodes)


@lru_cache(maxsize=256)
def _module(op: str, V: int, dtype: str, k: int | None):
    attrs = {} if k is None else {"k": k}
    out = "int64" if op == "argmax" else "float32"
    p = params(op, attrs, [(1, V)], [dtype], out)
    if p is None:
        raise ValueError(f"no {op} kernel for V={V} {dtype}" + ("" if k is None else f" k={k}"))
    return codegen.load_kernel(source(p))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy ids, == torch.argmax(logits, dim=-1)."""
    return _module("argmax", logits.shape[-1], dtype_name(logits.dtype), None).launch(logits)


def softmax_topk(logits: torch.Tensor, temperature, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs float32, ids int64) == torch.softmax(logits.float() / temperature, -1).topk(k)."""
    mod = _module("softmax_topk", logits.shape[-1], dtype_name(logits.dtype), k)
    return mod.launch(logits, temperature)


def argmax_reference(logits: torch.Tensor) -> torch.Tensor:
    return torch.argmax(logits, dim=-1)


def softmax_topk_reference(logits: torch.Tensor, temperature, k: int):
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    if t.dim() > 0:
        t = t.reshape(*t.shape, *([1] * (logits.dim() - t.dim())))
    probs = torch.softmax(logits.float() / t, dim=-1).topk(k, dim=-1)
    return probs.values, probs.indices
