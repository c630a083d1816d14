"""Reference attention: dense causal `sdpa` and `paged_attention` over a paged KV cache.

Layouts follow the traced graph: q is [1, H, T, D] and k, v are [1, Hkv, T, D], where T is
the flat token batch of one step (several sequences' prefill chunks and decode tokens laid
end to end). Only attention knows where one sequence ends and the next begins, from the
metadata:

- `slot_mapping` [T]: cache slot (block * block_size + offset) each token's K/V is written to
- `block_tables` [S, max_blocks]: the blocks of each sequence, in order
- `context_lens` [S]: tokens of each sequence in the cache after this step's writes
- `query_start_loc` [S + 1]: where each sequence's query tokens start in the flat batch

The KV cache of layer `l` is `ctx.kv_caches[l] = (key_cache, value_cache)`, each
[num_blocks, block_size, Hkv, D].

Quantized KV cache: with `kv_dtype` "int8" or "float8_e4m3fn" (set by the builder's
`quantize_kv_cache`) the cache holds codes with static per-KV-head scales `k_scale`,
`v_scale` (lists of Hkv positive floats; K's apply after RoPE). The write stores
int8: clamp(round(x / scale[h]), -127, 127), fp8: clamp(x / scale[h], -448, 448) in
float8_e4m3fn, computed in fp32; reads dequantize (code.float() * scale[h]) and cast to q's
dtype. Without `kv_dtype` the cache is read and written in its own (float) dtype.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

# kv_dtype attr -> cache dtype
KV_QUANT_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8}
if hasattr(torch, "float8_e4m3fn"):
    KV_QUANT_DTYPES["float8_e4m3fn"] = torch.float8_e4m3fn
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_QUANT_CACHE = frozenset(KV_QUANT_DTYPES.values())
_FP8 = _QUANT_CACHE - {torch.int8}


def rope_half(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _allowed(n_q: int, n_ctx: int, window: int | None, device) -> torch.Tensor:
    """Causal (optionally sliding-window) mask for the last n_q of n_ctx positions."""
    q_pos = torch.arange(n_ctx - n_q, n_ctx, device=device)[:, None]
    k_pos = torch.arange(n_ctx, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """ALiBi's additive scores, slopes[h] * (key position - query position): [..., H, Tq, S]
    for slopes [H] (fp32), q_pos [..., Tq] and k_pos [..., S]. MPT adds slopes[h] * (key -
    (keys - 1)) instead, which differs by a constant per query row: the same softmax."""
    rel = (k_pos.unsqueeze(-2) - q_pos.unsqueeze(-1)).float()
    return rel.unsqueeze(-3) * slopes.view(-1, 1, 1)


def attend(q, k, v, allowed, *, scale, softcap=None, sinks=None, bias=None):
    """softmax(q k^T * scale [soft-capped] [+ bias], masked to `allowed`) v, with k/v's heads
    shared by groups of q's (GQA). Soft-capping (Gemma 2: softcap * tanh(s / softcap) on the
    scores before the mask), sinks (gpt-oss: a learned logit per head [H] that joins each
    row's softmax and adds no value) and an additive `bias` broadcastable to the scores (ALiBi,
    `alibi_bias`) have no SDPA kernel, so they take the explicit path, in fp32."""
    gqa = k.shape[-3] != q.shape[-3]
    if softcap is None and sinks is None and bias is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                              enable_gqa=gqa)
    if gqa:
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
    sink = sinks.float().reshape(-1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return (probs @ v.float()).to(q.dtype)


def sdpa(q, k, v, sinks=None, *, scale, window=None, softcap=None, alibi=None):
    """Causal attention of one sequence (the traced form, before the kv_cache pass)."""
    n_q, n_ctx = q.shape[-2], k.shape[-2]
    mask = _allowed(n_q, n_ctx, window, q.device)
    return attend(q, k, v, mask, scale=scale, softcap=softcap, sinks=sinks,
                  bias=_prefill_alibi(alibi, n_q, n_ctx, q.device))


def _prefill_alibi(alibi, n_q: int, n_ctx: int, device) -> torch.Tensor | None:
    """The ALiBi bias [H, n_q, n_ctx] of the last n_q of n_ctx positions (None without)."""
    if alibi is None:
        return None
    slopes = alibi if isinstance(alibi, torch.Tensor) else _scale_tensor(tuple(alibi), device)
    return alibi_bias(slopes, torch.arange(n_ctx - n_q, n_ctx, device=device),
                      torch.arange(n_ctx, device=device))


@lru_cache(maxsize=1024)
def _scale_tensor(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def kv_scale_tensors(k_scale, v_scale, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-KV-head scale lists of a node's attrs as fp32 [Hkv] tensors on `device`,
    made once per (values, device) and reused by every later call (and CUDA graph replay)."""
    device = torch.device(device)
    return _scale_tensor(tuple(k_scale), device), _scale_tensor(tuple(v_scale), device)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [..., Hkv, D] -> codes of the cache dtype, with scale [Hkv] (fp32) per KV head."""
    y = x.float() / scale[:, None]
    if dtype == torch.int8:
        return y.round_().clamp_(-INT8_MAX, INT8_MAX).to(dtype)
    return y.clamp_(-FP8_MAX, FP8_MAX).to(dtype)


@lru_cache(maxsize=8)
def _fp8_values(device: torch.device) -> torch.Tensor:
    """fp32 value of each of the 256 float8_e4m3fn bit patterns, as torch converts them."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().to(device)


def _as_bytes(cache: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor as its uint8 bit patterns (other dtypes as they are): fp8 caches are
    scattered and gathered as bytes, which every device's indexing kernels take."""
    return cache.view(torch.uint8) if cache.dtype in _FP8 else cache


def _codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Codes (int8, float8_e4m3fn, or fp8 bit patterns as uint8) -> a new fp32 tensor."""
    if codes.dtype == torch.int8:
        return codes.float()
    if codes.device.type != "cpu":
        return codes.view(torch.float8_e4m3fn).float()
    # torch converts fp8 on the CPU element by element: a table lookup is ~5x faster
    bits = codes.view(torch.uint8).reshape(-1).int()
    return _fp8_values(codes.device).index_select(0, bits).view(codes.shape)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
                  ) -> torch.Tensor:
    """codes [..., Hkv, D] of the cache -> values in `dtype` (a plain cast without scale)."""
    if scale is None:
        return codes.to(dtype)
    values = _codes_to_float(codes)  # a new tensor
    # the scale laid out as the last two dims [Hkv, D]: a broadcast over a unit stride
    # multiplies ~3x faster on the CPU than one over [Hkv, 1]
    values.mul_(scale[:, None].expand(codes.shape[-2:]).contiguous())
    return values.to(dtype)


def write_kv(key_cache, value_cache, k, v, slot_mapping, k_scale=None, v_scale=None):
    """Scatter this step's K/V ([1, Hkv, T, D]) into the cache slots; slot -1 is skipped.
    With scales ([Hkv] fp32 tensors) the values are quantized to the cache's dtype."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat_k = key_cache.view(-1, *key_cache.shape[2:])
    flat_v = value_cache.view(-1, *value_cache.shape[2:])
    new_k, new_v = k[0].transpose(0, 1)[keep], v[0].transpose(0, 1)[keep]
    if k_scale is None:
        flat_k[slots] = new_k.to(key_cache.dtype)
        flat_v[slots] = new_v.to(value_cache.dtype)
    else:
        _as_bytes(flat_k)[slots] = _as_bytes(quantize_kv(new_k, k_scale, key_cache.dtype))
        _as_bytes(flat_v)[slots] = _as_bytes(quantize_kv(new_v, v_scale, value_cache.dtype))


def _check_cache(key_cache, value_cache, layer, kv_dtype, k_scale, v_scale) -> bool:
    """Whether the layer's cache is quantized; raises when the cache and attrs disagree."""
    if kv_dtype is None:
        if key_cache.dtype in _QUANT_CACHE or value_cache.dtype in _QUANT_CACHE:
            raise ValueError(f"paged_attention layer {layer}: the KV cache is "
                             f"{key_cache.dtype} but the node has no kv_dtype/scales; "
                             "rebuild the engine with a quantized KV cache")
        return False
    want = KV_QUANT_DTYPES.get(kv_dtype)
    if want is None:
        raise ValueError(f"paged_attention layer {layer}: kv_dtype {kv_dtype!r} is not one "
                         f"of {', '.join(KV_QUANT_DTYPES)}")
    if key_cache.dtype != want or value_cache.dtype != want:
        raise ValueError(f"paged_attention layer {layer}: kv_dtype {kv_dtype} but the cache "
                         f"is {key_cache.dtype}/{value_cache.dtype}")
    if k_scale is None or v_scale is None:
        raise ValueError(f"paged_attention layer {layer}: kv_dtype {kv_dtype} needs k_scale "
                         "and v_scale")
    return True


def gather_kv(cache, blocks, n_ctx):
    """[n_ctx, Hkv, D] view of a sequence's history, following its block table."""
    # index_select, not cache[blocks]: advanced indexing goes through a generic parallel
    # gather that cost ~1000x more for a handful of blocks (measured, torch 2.13 CPU).
    return cache.index_select(0, blocks).flatten(0, 1)[:n_ctx]


def paged_attention(q, k, v, slot_mapping, block_tables, context_lens, query_start_loc,
                    cos=None, sin=None, *, ctx, layer, scale, window=None, num_heads=None,
                    num_kv_heads=None, head_dim=None, kv_dtype=None, k_scale=None,
                    v_scale=None, kv_head_map=None, softcap=None, sinks=None, alibi=None):
    """Write K/V into the paged cache, then attend each sequence's queries to its history.

    With `cos`/`sin` given, rotary embedding is applied to q and k first (the fuse pass
    folds RoPE into attention this way). Head counts are recorded for the kernels; here they
    follow from the shapes. With `kv_dtype` the cache is quantized with the per-KV-head
    `k_scale`/`v_scale` lists (module docstring). `kv_head_map[h]` names the KV head query
    head h reads when the grouping is not uniform (a tensor-parallel rank whose query heads
    straddle KV groups). `alibi`: per-query-head slopes, adding slopes[h] * (key position -
    query position) to the scores (MPT)."""
    if cos is not None:
        q, k = rope_half(q, cos, sin), rope_half(k, cos, sin)
    key_cache, value_cache = ctx.kv_caches[layer]
    ks = vs = None
    if _check_cache(key_cache, value_cache, layer, kv_dtype, k_scale, v_scale):
        ks, vs = kv_scale_tensors(k_scale, v_scale, key_cache.device)
    write_kv(key_cache, value_cache, k, v, slot_mapping, ks, vs)
    if ks is not None:  # read the codes (fp8 as bytes, see _as_bytes)
        key_cache, value_cache = _as_bytes(key_cache), _as_bytes(value_cache)
    block_size = key_cache.shape[1]
    head_map = None if kv_head_map is None else torch.tensor(kv_head_map, device=q.device)
    sinks = None if sinks is None else _scale_tensor(tuple(sinks), q.device)
    alibi = None if alibi is None else _scale_tensor(tuple(alibi), q.device)
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    n_q = [starts[s + 1] - starts[s] for s in range(len(lens))]
    # Decode tokens (one query each) of all sequences go through one padded, masked SDPA:
    # a Python loop over sequences would cost a dispatch per sequence per layer.
    decode = [s for s, n in enumerate(n_q) if n == 1]
    if decode:
        _decode_attention(q, out, key_cache, value_cache, block_tables, decode, starts, lens,
                          scale, window, ks, vs, head_map, softcap, sinks, alibi)
    done = set(decode)
    for s, n_ctx in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0 or s in done:
            continue
        blocks = block_tables[s, : (n_ctx + block_size - 1) // block_size]
        keys = dequantize_kv(gather_kv(key_cache, blocks, n_ctx), ks, q.dtype).transpose(0, 1)
        values = dequantize_kv(gather_kv(value_cache, blocks, n_ctx), vs, q.dtype
                               ).transpose(0, 1)
        if head_map is not None:
            keys, values = keys.index_select(0, head_map), values.index_select(0, head_map)
        mask = _allowed(q1 - q0, n_ctx, window, q.device)
        out[0, :, q0:q1] = attend(q[0, :, q0:q1], keys, values, mask, scale=scale,
                                  softcap=softcap, sinks=sinks,
                                  bias=_prefill_alibi(alibi, q1 - q0, n_ctx, q.device))
    return out


def _decode_attention(q, out, key_cache, value_cache, block_tables, seqs, starts, lens, scale,
                      window, k_scale=None, v_scale=None, head_map=None, softcap=None,
                      sinks=None, alibi=None):
    block_size = key_cache.shape[1]
    idx = torch.tensor(seqs, device=q.device)
    ctx = torch.tensor([lens[s] for s in seqs], device=q.device)
    rows = torch.tensor([starts[s] for s in seqs], device=q.device)
    n_blocks = (max(lens[s] for s in seqs) + block_size - 1) // block_size
    tables = block_tables.index_select(0, idx)[:, :n_blocks].flatten()
    # [B * n_blocks, block, Hkv, D] -> [B, Hkv, L, D]
    shape = (len(seqs), n_blocks * block_size, *key_cache.shape[2:])
    keys = dequantize_kv(key_cache.index_select(0, tables).view(shape), k_scale, q.dtype)
    values = dequantize_kv(value_cache.index_select(0, tables).view(shape), v_scale, q.dtype)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    if head_map is not None:
        keys, values = keys.index_select(1, head_map), values.index_select(1, head_map)
    k_pos = torch.arange(keys.shape[2], device=q.device)[None, :]
    allowed = k_pos < ctx[:, None]
    if window is not None:
        allowed &= k_pos > (ctx[:, None] - 1 - window)
    queries = q[0, :, rows].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
    # each sequence's one query sits at its last position, ctx - 1
    bias = None if alibi is None else alibi_bias(alibi, (ctx - 1)[:, None], k_pos)
    res = attend(queries, keys, values, allowed[:, None, None], scale=scale, softcap=softcap,
                 sinks=sinks, bias=bias)
    out[0, :, rows] = res.squeeze(2).transpose(0, 1)
