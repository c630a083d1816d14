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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def sdpa(q, k, v, *, scale, window=None):
    """Causal attention of one sequence (the traced form, before the kv_cache pass)."""
    mask = _allowed(q.shape[-2], k.shape[-2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def write_kv(key_cache, value_cache, k, v, slot_mapping):
    """Scatter this step's K/V ([1, Hkv, T, D]) into the cache slots; slot -1 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat_k = key_cache.view(-1, *key_cache.shape[2:])
    flat_v = value_cache.view(-1, *value_cache.shape[2:])
    flat_k[slots] = k[0].transpose(0, 1)[keep].to(key_cache.dtype)
    flat_v[slots] = v[0].transpose(0, 1)[keep].to(value_cache.dtype)


def gather_kv(cache, blocks, n_ctx):
    """[n_ctx, Hkv, D] view of a sequence's history, following its block table."""
    # index_select, not cache[blocks]: advanced indexing goes through a generic parallel
    # gather that cost ~1000x more for a handful of blocks (measured, torch 2.13 CPU).
    return cache.index_select(0, blocks).flatten(0, 1)[:n_ctx]


def paged_attention(q, k, v, slot_mapping, block_tables, context_lens, query_start_loc,
                    cos=None, sin=None, *, ctx, layer, scale, window=None, num_heads=None,
                    num_kv_heads=None, head_dim=None):
    """Write K/V into the paged cache, then attend each sequence's queries to its history.

    With `cos`/`sin` given, rotary embedding is applied to q and k first (the fuse pass
    folds RoPE into attention this way). Head counts are recorded for the kernels; here they
    follow from the shapes."""
    if cos is not None:
        q, k = rope_half(q, cos, sin), rope_half(k, cos, sin)
    key_cache, value_cache = ctx.kv_caches[layer]
    write_kv(key_cache, value_cache, k, v, slot_mapping)
    block_size = key_cache.shape[1]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    n_q = [starts[s + 1] - starts[s] for s in range(len(lens))]
    # Decode tokens (one query each) of all sequences go through one padded, masked SDPA:
    # a Python loop over sequences would cost a dispatch per sequence per layer.
    decode = [s for s, n in enumerate(n_q) if n == 1]
    if decode:
        _decode_attention(q, out, key_cache, value_cache, block_tables, decode, starts, lens,
                          scale, window)
    done = set(decode)
    for s, n_ctx in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0 or s in done:
            continue
        blocks = block_tables[s, : (n_ctx + block_size - 1) // block_size]
        keys = gather_kv(key_cache, blocks, n_ctx).transpose(0, 1).to(q.dtype)
        values = gather_kv(value_cache, blocks, n_ctx).transpose(0, 1).to(q.dtype)
        mask = _allowed(q1 - q0, n_ctx, window, q.device)
        out[0, :, q0:q1] = F.scaled_dot_product_attention(
            q[0, :, q0:q1], keys, values, attn_mask=mask, scale=scale,
            enable_gqa=keys.shape[0] != q.shape[1],
        )
    return out


def _decode_attention(q, out, key_cache, value_cache, block_tables, seqs, starts, lens, scale,
                      window):
    block_size = key_cache.shape[1]
    idx = torch.tensor(seqs, device=q.device)
    ctx = torch.tensor([lens[s] for s in seqs], device=q.device)
    rows = torch.tensor([starts[s] for s in seqs], device=q.device)
    n_blocks = (max(lens[s] for s in seqs) + block_size - 1) // block_size
    tables = block_tables.index_select(0, idx)[:, :n_blocks].flatten()
    # [B * n_blocks, block, Hkv, D] -> [B, Hkv, L, D]
    shape = (len(seqs), n_blocks * block_size, *key_cache.shape[2:])
    keys = key_cache.index_select(0, tables).view(shape).transpose(1, 2).to(q.dtype)
    values = value_cache.index_select(0, tables).view(shape).transpose(1, 2).to(q.dtype)
    k_pos = torch.arange(keys.shape[2], device=q.device)[None, :]
    allowed = k_pos < ctx[:, None]
    if window is not None:
        allowed &= k_pos > (ctx[:, None] - 1 - window)
    queries = q[0, :, rows].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
    res = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed[:, None, None],
                                         scale=scale, enable_gqa=keys.shape[1] != q.shape[1])
    out[0, :, rows] = res.squeeze(2).transpose(0, 1)
