"""Triton paged attention: the `paged_attention` op (reference: `kernels/attention.py`).

Three templates, each rendering a self-contained module (one or two `@triton.jit` kernels and
a `launch`) that imports only torch and triton:

- `rope_kv`: RoPE of q and k (when cos/sin are given) fused with the KV-cache write by slot
  mapping (slot -1 skipped). Returns the queries the attention kernels read: a rotated
  [T, H, D] buffer, or q itself without RoPE.
- `paged_attention_decode`: sequences with one query; one program per (sequence, KV head,
  partition) covering the whole query-head group; split-K over partitions of
  `partition_size` keys with a second `reduce_kernel` when the block table is wide enough
  to need more than one partition.
- `paged_attention_prefill`: sequences with several queries (prefill and chunked prefill
  over a cached prefix), causal and optionally sliding-window.

Composition: the rendered modules do not know each other. `Launcher(p)` loads the three and
is the callable the runtime binds in place of the reference op: same calling convention
(`q, k, v, slot_mapping, block_tables, context_lens, query_start_loc, cos=None, sin=None, *,
ctx, layer, scale, window, num_heads, num_kv_heads, head_dim`). A call is three or four
launches: rope_kv, then decode and prefill over the whole flat batch, each kernel skipping
the other's sequences in-kernel. Grids are sized from tensor shapes only (T, S, the block
table's width), so a call never reads device values on the host.

`scale` and `window` are launch arguments, not template parameters, so one rendering serves
every layer of a model (sliding and full-attention layers alike). The output is
`torch.empty_like(q)`, as in the reference; rows of tokens that belong to no sequence
(padding after query_start_loc[-1]) are left unwritten, as there.

Quantized KV cache (`kv_dtype` "int8" or "float8_e4m3fn", with per-KV-head `k_scale` and
`v_scale` node attrs, as in the reference): the cache dtype is a template parameter; the
scales are not, they are passed at call time like `scale` (made into fp32 [Hkv] tensors once
per layer and device, `kernels.attention.kv_scale_tensors`). rope_kv quantizes K (after RoPE)
and V as it writes them; the attention kernels convert the codes exactly to q's dtype and fold
the K scale into the score scale and the V scale into the output. Float renderings are
byte-identical to those before quantized caches existed (engines built then still verify).

Unsupported (`params` returns None): soft-capped scores (`softcap`, Gemma 2), attention sinks
(`sinks`, gpt-oss), ALiBi (`alibi`, MPT), head_dim > 256, num_heads not a multiple of
num_kv_heads or groups over 128 heads, q dtypes other than float32/float16/bfloat16, cache
dtypes other than those or int8/float8_e4m3fn (the latter two only with the node's
`kv_dtype` equal to the cache dtype and `k_scale`/`v_scale` of one positive value per KV
head). RoPE needs an even head_dim (the call raises otherwise), cos/sin in q's dtype and
shared by all heads (broadcastable to [1, 1, T, D]).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llm_engine.kernels.attention import kv_scale_tensors
from llm_engine.kernels.codegen import load_kernel, render
from llm_engine.kernels.triton import next_pow2

TEMPLATES = ("rope_kv", "paged_attention_decode", "paged_attention_prefill")

DTYPES = ("float32", "float16", "bfloat16")
QUANT_DTYPES = ("int8", "float8_e4m3fn")  # cache only, with per-KV-head scales
MAX_HEAD_DIM = 256
MAX_GROUP = 128


def _scales_ok(attrs: dict, kv_cache_dtype: str, kv_heads: int) -> bool:
    if attrs.get("kv_dtype") != kv_cache_dtype:
        return False
    for key in ("k_scale", "v_scale"):
        values = attrs.get(key)
        if not isinstance(values, list | tuple) or len(values) != kv_heads:
            return False
        if not all(isinstance(x, int | float) and not isinstance(x, bool) and 0 < x < math.inf
                   for x in values):
            return False
    return True


def params(attrs: dict, q_shape, kv_cache_dtype: str, q_dtype: str, block_size: int
           ) -> dict | None:
    """Template parameters for a `paged_attention` node, or None when unsupported.

    head_dim is padded to a power of two (at least 16, the smallest tl.dot) with masks, so
    any head_dim up to 256 works; odd head_dims work without RoPE only. The query-head group
    is padded to at least 16 rows for the decode dot."""
    heads, kv_heads, head_dim = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
    if attrs.get("kv_head_map") is not None:  # a non-uniform grouping (tensor-parallel shard)
        return None
    if attrs.get("softcap") or attrs.get("sinks") or attrs.get("alibi"):
        # Gemma 2, gpt-oss, MPT: the reference runs them
        return None
    if not all(isinstance(x, int) and x > 0 for x in (heads, kv_heads, head_dim)):
        return None
    if len(q_shape) != 4 or any(isinstance(x, int) and x != want
                                for x, want in zip(q_shape, (1, heads, None, head_dim))
                                if want is not None):
        return None
    if heads % kv_heads or heads // kv_heads > MAX_GROUP or head_dim > MAX_HEAD_DIM:
        return None
    if q_dtype not in DTYPES:
        return None
    if kv_cache_dtype in QUANT_DTYPES:
        if not _scales_ok(attrs, kv_cache_dtype, kv_heads):
            return None
    elif kv_cache_dtype not in DTYPES or attrs.get("kv_dtype") is not None:
        return None
    if not isinstance(block_size, int) or block_size < 1:
        return None
    group = heads // kv_heads
    d_pad = max(16, next_pow2(head_dim))
    block_n = 64 if d_pad <= 128 else 32
    prefill_m = max(64 if d_pad <= 128 else 32, next_pow2(group))
    return {
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "head_dim_pad": d_pad,
        "heads_pad": next_pow2(heads),
        "kv_heads_pad": next_pow2(kv_heads),
        "group": group,
        "block_g": max(16, next_pow2(group)),
        "block_size": block_size,
        "q_dtype": q_dtype,
        "kv_dtype": kv_cache_dtype,
        # fp32 scores need IEEE products: TF32 would cost ~1e-3 relative error
        "dot_kwargs": ', input_precision="ieee"' if q_dtype == "float32" else "",
        "block_n": block_n,
        "partition_size": 512,
        "block_m": prefill_m,
        "block_q": prefill_m // group,
        "rope_num_warps": 1 if heads * d_pad <= 1024 else 4,
        "decode_num_warps": 4,
        "reduce_num_warps": 4,
        "prefill_num_warps": 4 if prefill_m * d_pad <= 64 * 64 else 8,
    }


def check(p: dict[str, Any]) -> None:
    """Reject parameter sets the templates cannot render correctly (e.g. hand-tuned ones)."""
    def pow2(n):
        return isinstance(n, int) and n >= 16 and n & (n - 1) == 0

    if p["kv_dtype"] not in DTYPES + QUANT_DTYPES or p["q_dtype"] not in DTYPES:
        raise ValueError(f"dtypes q {p['q_dtype']} / cache {p['kv_dtype']}")
    if not (pow2(p["head_dim_pad"]) and p["head_dim_pad"] >= p["head_dim"]):
        raise ValueError(f"head_dim_pad {p['head_dim_pad']} for head_dim {p['head_dim']}")
    if not pow2(p["block_n"]) or not pow2(p["block_g"]) or p["block_g"] < p["group"]:
        raise ValueError("block_n and block_g must be powers of two >= 16 (block_g >= group)")
    if p["partition_size"] < p["block_n"] or p["partition_size"] % p["block_n"]:
        raise ValueError(f"partition_size {p['partition_size']} is not a multiple of block_n "
                         f"{p['block_n']}")
    if not pow2(p["block_m"]) or p["block_q"] != p["block_m"] // p["group"] or p["block_q"] < 1:
        raise ValueError(f"block_m {p['block_m']} / block_q {p['block_q']} for group "
                         f"{p['group']}")


def sources(p: dict[str, Any], nodes: list[str] | None = None) -> dict[str, str]:
    """Template name -> rendered module source."""
    check(p)
    return {name: render(name, p, nodes=nodes) for name in TEMPLATES}


def launch(q, k, v, slot_mapping, block_tables, context_lens, query_start_loc, cos=None,
           sin=None, *, ctx, layer, scale, window=None, num_heads=None, num_kv_heads=None,
           head_dim=None, kv_dtype=None, k_scale=None, v_scale=None, modules):
    """The reference op's convention plus `modules` (template name -> loaded module). The
    modules must be rendered for a quantized cache exactly when scales are given."""
    key_cache, value_cache = ctx.kv_caches[layer]
    if q.stride(-1) != 1:
        q = q.contiguous()
    # the kernels index the metadata with unit inner strides
    slot_mapping, block_tables, context_lens, query_start_loc = (
        x if x.stride(-1) == 1 else x.contiguous()
        for x in (slot_mapping, block_tables, context_lens, query_start_loc))
    scales: dict[str, torch.Tensor] = {}
    if k_scale is not None:
        ks, vs = kv_scale_tensors(k_scale, v_scale, key_cache.device)
        scales = {"k_scale": ks, "v_scale": vs}
    queries = modules["rope_kv"].launch(q, k, v, slot_mapping, cos, sin, key_cache,
                                        value_cache, *scales.values())
    out = torch.empty_like(q)  # like the reference: q's layout when q is dense
    args = (queries, out, key_cache, value_cache, block_tables, context_lens, query_start_loc,
            scale, window)
    modules["paged_attention_decode"].launch(*args, **scales)
    modules["paged_attention_prefill"].launch(*args, **scales)
    return out


class Launcher:
    """The three rendered modules of one parameter set, callable as the `paged_attention`
    op. Head counts and head_dim given at call time must match the rendering."""

    def __init__(self, p: dict[str, Any], nodes: list[str] | None = None, *,
                 modules: dict[str, Any] | None = None) -> None:
        """Renders and loads the templates, or takes `modules` already loaded (the runtime
        loads them from an engine's verified sources)."""
        self.params = p
        if modules is None:
            modules = {name: load_kernel(src) for name, src in sources(p, nodes).items()}
        self.modules = modules

    def __call__(self, q, k, v, slot_mapping, block_tables, context_lens, query_start_loc,
                 cos=None, sin=None, *, ctx, layer, scale, window=None, num_heads=None,
                 num_kv_heads=None, head_dim=None, kv_dtype=None, k_scale=None, v_scale=None):
        p = self.params
        for name, got in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim)):
            if got is not None and got != p[name]:
                raise ValueError(f"paged_attention: {name}={got}, kernels rendered for "
                                 f"{p[name]}")
        if cos is not None and p["head_dim"] % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {p['head_dim']}")
        quant = p["kv_dtype"] in QUANT_DTYPES
        if kv_dtype != (p["kv_dtype"] if quant else None):
            raise ValueError(f"paged_attention layer {layer}: kv_dtype={kv_dtype}, kernels "
                             f"rendered for a {p['kv_dtype']} cache")
        if quant and (k_scale is None or v_scale is None):
            raise ValueError(f"paged_attention layer {layer}: a {kv_dtype} cache needs "
                             "k_scale and v_scale")
        return launch(q, k, v, slot_mapping, block_tables, context_lens, query_start_loc, cos,
                      sin, ctx=ctx, layer=layer, scale=scale, window=window,
                      k_scale=k_scale if quant else None, v_scale=v_scale if quant else None,
                      modules=self.modules)
