"""Triton paged attention (templates rope_kv, paged_attention_decode, paged_attention_prefill)
against the torch reference `kernels.attention.paged_attention` and a dense fp64 causal
attention.

Each case is one step's flat batch over a shuffled block pool whose unused slots hold
garbage: decode tokens (one with a context spanning several split-K partitions, one sharing
its prefix blocks with another sequence, one with a one-token context), a prefill from
scratch, a chunked prefill whose prefix is already cached (also sharing blocks), and two
padding tokens with slot -1 that belong to no sequence. Checked: the output rows of all
sequence tokens, the whole K and V caches (written slots and untouched ones), with every
buffer the launch allocates filled with NaN first.

Tolerances (relative to the largest magnitude, `util.rel_error`): RTOL of the coarser of the
query and cache dtypes (fp32 1e-5, fp16 2e-3, bf16 1.6e-2) for the output against both the
reference op and the dense fp64 attention; observed over the sweep at most 0.03x (fp32),
0.4x (fp16) and 0.55x (bf16) of it. The kernel keeps scores and the softmax in fp32, so it
is closer to the dense result than the reference, which rounds each step to q's dtype.
K cache: exact without RoPE; with RoPE, RTOL of the cache dtype (the kernel rotates in fp32,
the reference in q's dtype: one rounding apart), and untouched slots exact. V cache: exact.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from llm_engine.kernels.attention import paged_attention, rope_half
from llm_engine.kernels.codegen import load_kernel
from llm_engine.kernels.triton import attention as tri
from tests.triton.util import RTOL, PoisonedTorch, rel_error

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture
def poisoned(monkeypatch):
    """Make the launcher and the rendered modules allocate NaN-filled buffers."""
    def apply(launcher):
        monkeypatch.setattr(tri, "torch", PoisonedTorch())
        for mod in launcher.modules.values():
            monkeypatch.setattr(mod, "torch", PoisonedTorch())
        return launcher
    return apply


def make_launcher(heads, kv_heads, head_dim, block_size, q_dtype, kv_dtype, split=True):
    p = tri.params({"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim},
                   (1, heads, "T", head_dim), kv_dtype, q_dtype, block_size)
    assert p is not None
    if split:  # small partitions: the long decode context spans several
        p = {**p, "block_n": 16, "partition_size": 32}
    return tri.Launcher(p)


def _seq_plan(block_size, kinds):
    """(n_ctx, n_q, index of the sequence whose first block it shares) per sequence."""
    bs = block_size
    plans = {
        "decode_long": (4 * bs + 61, 1, None),   # several partitions of 32
        "decode_shared": (bs + 5, 1, "decode_long"),  # first block shared with it
        "decode_one": (1, 1, None),              # first token of a sequence
        "prefill": (11, 11, None),               # prompt from scratch
        "chunked": (bs + 9, 7, "decode_long"),  # 7 new tokens after bs + 2 cached ones
        "chunked_long": (bs + 52, 50, "decode_long"),  # 50 new tokens: three query tiles
    }
    return [(n, n_q, None if owner is None else kinds.index(owner))
            for n, n_q, owner in (plans[k] for k in kinds)]


ALL_KINDS = ("decode_long", "decode_shared", "prefill", "chunked", "decode_one")


def make_batch(heads, kv_heads, head_dim, block_size, q_dtype, kv_dtype, *, rope, window,
               kinds=ALL_KINDS, pad_tokens=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    qd, kd = DT[q_dtype], DT[kv_dtype]
    bs = block_size
    plan = _seq_plan(bs, kinds)
    # K/V history of every sequence as the cache stores it (already rotated), fp32 values
    # exactly representable in the cache dtype; shared blocks repeat their owner's values
    hist = [(torch.randn(kv_heads, n, head_dim, generator=g).to(kd).float(),
             torch.randn(kv_heads, n, head_dim, generator=g).to(kd).float())
            for n, _, _ in plan]
    n_blocks_of = [-(-n // bs) for n, _, _ in plan]
    pool = torch.randperm(sum(n_blocks_of) + 7, generator=g).tolist()
    tables: list[list[int]] = []
    for (n, n_q, owner), nb in zip(plan, n_blocks_of):
        table = []
        if owner is not None:  # share the owner's first block (full, before both chunks)
            assert bs <= n - n_q and bs <= plan[owner][0] - plan[owner][1]
            table.append(tables[owner][0])
            for h in range(2):
                hist[len(tables)][h][:, :bs] = hist[owner][h][:, :bs]
        while len(table) < nb:
            table.append(pool.pop())
        tables.append(table)
    num_blocks = sum(n_blocks_of) + 7
    key_cache = (torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g) * 50).to(kd)
    value_cache = (torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g) * 50).to(kd)
    for (n, n_q, _), table, (hk, hv) in zip(plan, tables, hist):
        for pos in range(n - n_q):  # the cached prefix
            blk, off = table[pos // bs], pos % bs
            key_cache[blk, off] = hk[:, pos].to(kd)
            value_cache[blk, off] = hv[:, pos].to(kd)
    # this step's tokens; with RoPE, k is given unrotated and cos/sin rotate it
    n_tok = sum(n_q for _, n_q, _ in plan) + pad_tokens
    q = torch.randn(1, heads, n_tok, head_dim, generator=g).to(qd)
    k = torch.randn(1, kv_heads, n_tok, head_dim, generator=g).to(qd)
    v = torch.randn(1, kv_heads, n_tok, head_dim, generator=g).to(qd)
    positions, slots, starts = [], [], [0]
    for (n, n_q, _), table in zip(plan, tables):
        for pos in range(n - n_q, n):
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
        starts.append(starts[-1] + n_q)
    positions += [0] * pad_tokens
    slots += [-1] * pad_tokens
    cos = sin = None
    if rope:
        inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).double() / head_dim)
        ang = torch.tensor(positions).double()[:, None] * inv[None, :]
        ang = torch.cat((ang, ang), dim=-1)
        cos, sin = ang.cos().to(qd)[None, None], ang.sin().to(qd)[None, None]
    width = max(len(t) for t in tables) + 1  # a spare column, as a padded table may have
    block_tables = torch.zeros(len(plan), width, dtype=torch.int32)
    for s, t in enumerate(tables):
        block_tables[s, :len(t)] = torch.tensor(t, dtype=torch.int32)
    # HF layout: q/k/v are transposed views of [1, T, H, D]
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    return SimpleNamespace(
        q=q, k=k, v=v, cos=cos, sin=sin, plan=plan, hist=hist, window=window,
        scale=1 / math.sqrt(head_dim), key_cache=key_cache, value_cache=value_cache,
        slot_mapping=torch.tensor(slots, dtype=torch.int64), block_tables=block_tables,
        context_lens=torch.tensor([n for n, _, _ in plan], dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        n_real=starts[-1], heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def run_op(fn, b):
    ctx = SimpleNamespace(kv_caches=[None, (b.key_cache.clone(), b.value_cache.clone())])
    out = fn(b.q, b.k, b.v, b.slot_mapping, b.block_tables, b.context_lens, b.query_start_loc,
             b.cos, b.sin, ctx=ctx, layer=1, scale=b.scale, window=b.window,
             num_heads=b.heads, num_kv_heads=b.kv_heads, head_dim=b.head_dim)
    return out, ctx.kv_caches[1]


def dense(b) -> torch.Tensor:
    """fp64 causal attention of every sequence over its whole history: [H, n_real, D]."""
    q = b.q[0].double()
    k_new = b.k[0].double()
    if b.cos is not None:
        q = rope_half(q, b.cos[0].double(), b.sin[0].double())
        k_new = rope_half(k_new, b.cos[0].double(), b.sin[0].double())
    group = b.heads // b.kv_heads
    outs = []
    start = 0
    for (n, n_q, _), (hk, hv) in zip(b.plan, b.hist):
        keys = torch.cat((hk[:, :n - n_q].double(), k_new[:, start:start + n_q]), dim=1)
        values = torch.cat((hv[:, :n - n_q].double(), b.v[0, :, start:start + n_q].double()),
                           dim=1)
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        scores = q[:, start:start + n_q] @ keys.transpose(1, 2) * b.scale
        q_pos = torch.arange(n - n_q, n)[:, None]
        k_pos = torch.arange(n)[None, :]
        allowed = k_pos <= q_pos
        if b.window is not None:
            allowed &= k_pos > q_pos - b.window
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(scores.softmax(-1) @ values)
        start += n_q
    return torch.cat(outs, dim=1)


def tolerance(q_dtype, kv_dtype):
    return max(RTOL[DT[q_dtype]], RTOL[DT[kv_dtype]])


def check_case(launcher, b, q_dtype, kv_dtype):
    want, (ref_k, ref_v) = run_op(paged_attention, b)
    got, (got_k, got_v) = run_op(launcher, b)
    assert got.shape == want.shape and got.dtype == want.dtype
    real = slice(0, b.n_real)
    assert not got[0, :, real].isnan().any(), "rows left unwritten"
    tol = tolerance(q_dtype, kv_dtype)
    err_ref = rel_error(got[0, :, real], want[0, :, real])
    err_dense = rel_error(got[0, :, real], dense(b))
    assert err_ref <= tol, f"vs reference: {err_ref:.3g} > {tol:.3g}"
    assert err_dense <= tol, f"vs dense: {err_dense:.3g} > {tol:.3g}"
    if b.cos is None:
        assert torch.equal(got_k, ref_k)
    else:
        err_k = rel_error(got_k, ref_k)
        assert err_k <= RTOL[DT[kv_dtype]], f"K cache: {err_k:.3g}"
        written = b.slot_mapping[b.slot_mapping >= 0]
        untouched = torch.ones(got_k.shape[0] * got_k.shape[1], dtype=torch.bool)
        untouched[written] = False
        assert torch.equal(got_k.flatten(0, 1)[untouched], b.key_cache.flatten(0, 1)[untouched])
    assert torch.equal(got_v, ref_v)
    return err_ref, err_dense


# ---- fast subset ---------------------------------------------------------------------------
FAST = [
    # heads, kv_heads, head_dim, block_size, q dtype, cache dtype, rope, window, split
    (9, 3, 64, 16, "float32", "float32", True, None, True),     # SmolLM2 shape
    (6, 2, 12, 4, "float16", "float16", True, 8, True),
    (9, 3, 12, 4, "bfloat16", "bfloat16", False, 8, True),
    (6, 2, 12, 16, "float16", "float32", True, None, False),
    (6, 2, 64, 4, "float32", "bfloat16", False, 5, False),
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,bs,q_dtype,kv_dtype,rope,window,split", FAST)
def test_paged_attention(poisoned, heads, kv_heads, head_dim, bs, q_dtype, kv_dtype, rope,
                         window, split):
    launcher = poisoned(make_launcher(heads, kv_heads, head_dim, bs, q_dtype, kv_dtype, split))
    b = make_batch(heads, kv_heads, head_dim, bs, q_dtype, kv_dtype, rope=rope, window=window)
    check_case(launcher, b, q_dtype, kv_dtype)


@pytest.mark.parametrize("kinds", [("decode_long", "decode_shared", "decode_one"),
                                   ("prefill", "decode_long", "chunked")])
def test_single_kind_batches(poisoned, kinds):
    """Decode-only (no prefill program does work) and mostly-prefill batches."""
    launcher = poisoned(make_launcher(6, 2, 12, 4, "float32", "float32"))
    b = make_batch(6, 2, 12, 4, "float32", "float32", rope=True, window=None, kinds=kinds,
                   pad_tokens=0)
    check_case(launcher, b, "float32", "float32")


def test_long_chunk_spans_tiles(poisoned):
    """A chunk longer than one query tile (block_q = 21 tokens for a group of 3) after a
    cached prefix, with a window shorter than the tile so later tiles start mid-context."""
    launcher = poisoned(make_launcher(6, 2, 12, 4, "float32", "float32"))
    assert launcher.params["block_q"] == 21 and launcher.params["block_n"] == 16
    b = make_batch(6, 2, 12, 4, "float32", "float32", rope=True, window=7,
                   kinds=("decode_long", "chunked_long", "prefill"), pad_tokens=1, seed=3)
    check_case(launcher, b, "float32", "float32")


def test_params_checker():
    def p(heads=9, kv_heads=3, head_dim=64, kv="float16", q="float16", bs=16):
        return tri.params({"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim},
                          (1, heads, "T", head_dim), kv, q, bs)

    smol = p()
    assert smol["group"] == 3 and smol["head_dim_pad"] == 64 and smol["block_q"] == 21
    assert p(head_dim=12)["head_dim_pad"] == 16  # padded, masked
    assert p(head_dim=80)["head_dim_pad"] == 128
    assert p(bs=5) is not None  # any block size: keys are gathered one by one
    assert p(heads=10, kv_heads=3) is None
    assert p(head_dim=512) is None
    assert p(kv="float8_e4m3fn") is None
    assert p(q="float64") is None
    assert p(bs=0) is None
    assert tri.params({"num_heads": 9, "num_kv_heads": 3, "head_dim": 64}, (1, 8, "T", 64),
                      "float16", "float16", 16) is None
    with pytest.raises(ValueError, match="partition_size"):
        tri.sources({**smol, "partition_size": 100})


def test_sources_deterministic_and_self_contained():
    p = tri.params({"num_heads": 6, "num_kv_heads": 2, "head_dim": 12}, (1, 6, "T", 12),
                   "float32", "float32", 4)
    a = tri.sources(p, nodes=["paged_attention_0"])
    assert a == tri.sources(p, nodes=["paged_attention_0"])
    assert set(a) == set(tri.TEMPLATES)
    for src in a.values():
        assert "# implements: paged_attention_0" in src
        imports = {line.split()[1] for line in src.splitlines()
                   if line.startswith(("import ", "from "))}
        assert imports <= {"torch", "triton", "triton.language"}
        assert hasattr(load_kernel(src), "launch")


def test_head_count_mismatch_rejected():
    launcher = make_launcher(6, 2, 12, 4, "float32", "float32")
    b = make_batch(6, 2, 12, 4, "float32", "float32", rope=False, window=None,
                   kinds=("decode_one",), pad_tokens=0)
    b.heads = 4
    with pytest.raises(ValueError, match="num_heads"):
        run_op(launcher, b)


# ---- sweep ---------------------------------------------------------------------------------
SWEEP_DTYPES = [("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"),
                ("float16", "float32"), ("bfloat16", "float16"), ("float32", "float16")]


@pytest.mark.slow
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("q_dtype,kv_dtype", SWEEP_DTYPES)
@pytest.mark.parametrize("bs", [4, 16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (6, 2, 12)])
def test_paged_attention_sweep(poisoned, heads, kv_heads, head_dim, bs, q_dtype, kv_dtype,
                               rope, window, split):
    launcher = poisoned(make_launcher(heads, kv_heads, head_dim, bs, q_dtype, kv_dtype, split))
    b = make_batch(heads, kv_heads, head_dim, bs, q_dtype, kv_dtype, rope=rope, window=window,
                   seed=bs + len(q_dtype))
    check_case(launcher, b, q_dtype, kv_dtype)



# ---- quantized KV cache (int8 / float8_e4m3fn with per-KV-head scales) ---------------------
@pytest.fixture
def fp8_rounding(monkeypatch):
    """Make the Triton 3.9 interpreter's fp32 -> float8e4nv conversion round as the GPU's
    cvt.rn.satfinite (and torch) do: to nearest even. The interpreter adds the rounding bit
    to the mantissa without carrying into the exponent (7.9 -> 4.0), rounds ties away from
    zero and flushes subnormals; an interpreter bug, not kernel behaviour."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    fp_to_fp = InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            x = torch.from_numpy(np.array(src.data, dtype=np.float32))
            bits = x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return TensorHandle(bits.reshape(np.shape(src.data)), tl.float8e4nv)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    monkeypatch.setattr(InterpreterBuilder, "create_fp_to_fp", create_fp_to_fp)


QUANT_LIMIT = {"int8": 127.0, "float8_e4m3fn": 448.0}
# Output vs the dense fp64 attention over the unquantized values, relative to the largest
# magnitude (scales = absmax / 127 resp. / 448 per KV head): int8 rounds each element by at
# most scale / 2, fp8 by 1/16 of its magnitude. Observed over the sweep: int8 1.1e-2, fp8
# 5.3e-2, the same for the reference op (the kernel adds nothing measurable).
QUANT_DENSE_TOL = {"int8": 2e-2, "float8_e4m3fn": 8e-2}


def quantize_batch(b, cache_dtype):
    """Turn a float32-cache batch into a quantized one: scales = absmax / limit per KV head
    over everything the step stores (cached history, and this step's K after RoPE and V),
    the caches (garbage slots included) quantized by the reference's `quantize_kv`."""
    from llm_engine.kernels.attention import quantize_kv, rope_half

    k_new = b.k[0].float()
    if b.cos is not None:
        k_new = rope_half(b.k[0], b.cos[0], b.sin[0]).float()
    keys = torch.cat([hk for hk, _ in b.hist] + [k_new], dim=1)
    values = torch.cat([hv for _, hv in b.hist] + [b.v[0].float()], dim=1)
    limit = QUANT_LIMIT[cache_dtype]
    ks = keys.abs().amax(dim=(1, 2)) / limit
    vs = values.abs().amax(dim=(1, 2)) / limit
    dtype = getattr(torch, cache_dtype)
    b.key_cache = quantize_kv(b.key_cache, ks, dtype)
    b.value_cache = quantize_kv(b.value_cache, vs, dtype)
    b.kv_dtype, b.k_scale, b.v_scale = cache_dtype, ks.tolist(), vs.tolist()
    b.k_absmax = keys.abs().max().item()
    return b


def run_quant_op(fn, b):
    ctx = SimpleNamespace(kv_caches=[None, (b.key_cache.clone(), b.value_cache.clone())])
    out = fn(b.q, b.k, b.v, b.slot_mapping, b.block_tables, b.context_lens, b.query_start_loc,
             b.cos, b.sin, ctx=ctx, layer=1, scale=b.scale, window=b.window,
             num_heads=b.heads, num_kv_heads=b.kv_heads, head_dim=b.head_dim,
             kv_dtype=b.kv_dtype, k_scale=b.k_scale, v_scale=b.v_scale)
    return out, ctx.kv_caches[1]


def dequant(cache, scale):
    return cache.double() * torch.tensor(scale, dtype=torch.float64)[:, None]


def code_step(cache, scale):
    """One rounding step of each stored value (int8: one code; fp8: one ulp, at most 1/8
    of the value, or the subnormal spacing 2^-9)."""
    s = torch.tensor(scale, dtype=torch.float64)[:, None]
    if cache.dtype == torch.int8:
        return s.expand(cache.shape)
    return s * (cache.double().abs() / 8 + 2.0 ** -9)


def check_quant_case(launcher, b, q_dtype, cache_dtype):
    want, (ref_k, ref_v) = run_quant_op(paged_attention, b)
    got, (got_k, got_v) = run_quant_op(launcher, b)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got_k.dtype == ref_k.dtype == getattr(torch, cache_dtype)
    real = slice(0, b.n_real)
    assert not got[0, :, real].isnan().any(), "rows left unwritten"
    # V and unrotated K: the same fp32 math and rounding as the reference, the same codes.
    assert torch.equal(got_v.view(torch.uint8), ref_v.view(torch.uint8))
    if b.cos is None:
        assert torch.equal(got_k.view(torch.uint8), ref_k.view(torch.uint8))
    else:
        # The kernel rotates in fp32, the reference in q's dtype (up to ~2 roundings of the
        # largest K apart), then each rounds to the nearest code: one step apart beyond that.
        diff = (dequant(got_k, b.k_scale) - dequant(ref_k, b.k_scale)).abs()
        bound = 2 * RTOL[DT[q_dtype]] * b.k_absmax + torch.maximum(
            code_step(got_k, b.k_scale), code_step(ref_k, b.k_scale))
        assert (diff <= bound * 1.0001).all(), f"K cache: {(diff - bound).max():.3g} over"
        written = b.slot_mapping[b.slot_mapping >= 0]
        untouched = torch.ones(got_k.shape[0] * got_k.shape[1], dtype=torch.bool)
        untouched[written] = False
        assert torch.equal(got_k.view(torch.uint8).flatten(0, 1)[untouched],
                           b.key_cache.view(torch.uint8).flatten(0, 1)[untouched])
    # The same codes read two ways: the reference dequantizes to q's dtype, the kernel folds
    # the scales into fp32 scores and outputs. With RoPE some K codes differ (above).
    err_ref = rel_error(got[0, :, real], want[0, :, real])
    tol_ref = RTOL[DT[q_dtype]] + (QUANT_DENSE_TOL[cache_dtype] if b.cos is not None else 0)
    assert err_ref <= tol_ref, f"vs reference: {err_ref:.3g} > {tol_ref:.3g}"
    err_dense = rel_error(got[0, :, real], dense(b))
    tol_dense = QUANT_DENSE_TOL[cache_dtype] + RTOL[DT[q_dtype]]
    assert err_dense <= tol_dense, f"vs dense: {err_dense:.3g} > {tol_dense:.3g}"
    return err_ref, err_dense


QUANT_FAST = [
    # heads, kv_heads, head_dim, block_size, q dtype, cache dtype, rope, window, split
    (9, 3, 64, 16, "bfloat16", "int8", True, None, True),
    (6, 2, 12, 4, "float32", "int8", False, 8, False),
    (6, 2, 12, 4, "float16", "float8_e4m3fn", True, 5, True),
    (9, 3, 12, 16, "float32", "float8_e4m3fn", False, None, False),
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,bs,q_dtype,cache,rope,window,split",
                         QUANT_FAST)
def test_paged_attention_quantized_cache(poisoned, fp8_rounding, heads, kv_heads, head_dim, bs, q_dtype,
                                         cache, rope, window, split):
    """GQA decode (split-K and not), prefill and chunked prefill over an int8 / fp8 cache."""
    launcher = poisoned(make_quant_launcher(heads, kv_heads, head_dim, bs, q_dtype, cache,
                                            split))
    b = make_batch(heads, kv_heads, head_dim, bs, q_dtype, "float32", rope=rope, window=window)
    check_quant_case(launcher, quantize_batch(b, cache), q_dtype, cache)


def make_quant_launcher(heads, kv_heads, head_dim, block_size, q_dtype, cache, split=True):
    attrs = {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
             "kv_dtype": cache, "k_scale": [1.0] * kv_heads, "v_scale": [1.0] * kv_heads}
    p = tri.params(attrs, (1, heads, "T", head_dim), cache, q_dtype, block_size)
    assert p is not None and p["kv_dtype"] == cache
    if split:
        p = {**p, "block_n": 16, "partition_size": 32}
    return tri.Launcher(p)


def test_quantized_params_checker():
    def p(cache="int8", **attrs):
        base = {"num_heads": 6, "num_kv_heads": 2, "head_dim": 12, "kv_dtype": cache,
                "k_scale": [0.1, 0.2], "v_scale": [0.3, 0.4]}
        return tri.params({**base, **attrs}, (1, 6, "T", 12), cache, "bfloat16", 16)

    assert p()["kv_dtype"] == "int8" and p("float8_e4m3fn")["kv_dtype"] == "float8_e4m3fn"
    assert p(kv_dtype=None) is None and p(kv_dtype="float8_e4m3fn") is None
    assert p(k_scale=None) is None and p(v_scale=[0.1]) is None
    assert p(k_scale=[0.1, 0.0]) is None and p(v_scale=[0.1, float("nan")]) is None
    assert p("uint8", kv_dtype="uint8") is None
    # a float cache with quantization attrs is refused: the rendering would ignore them
    assert p("bfloat16", kv_dtype="int8") is None
    # float renderings carry none of the quantized code
    flat = tri.params({"num_heads": 6, "num_kv_heads": 2, "head_dim": 12}, (1, 6, "T", 12),
                      "bfloat16", "bfloat16", 16)
    for name, src in tri.sources(flat).items():
        assert "scale_ptr" not in src and "ks_ptr" not in src, name
    for src in tri.sources(p()).values():
        assert "ks_ptr" in src


def test_quantized_launcher_needs_matching_attrs():
    launcher = make_quant_launcher(6, 2, 12, 4, "float32", "int8")
    b = quantize_batch(make_batch(6, 2, 12, 4, "float32", "float32", rope=False, window=None,
                                  kinds=("decode_one",), pad_tokens=0), "int8")
    b.kv_dtype = None
    with pytest.raises(ValueError, match="kv_dtype"):
        run_quant_op(launcher, b)
    b.kv_dtype, b.k_scale = "int8", None
    with pytest.raises(ValueError, match="k_scale"):
        run_quant_op(launcher, b)
    # a float launcher refuses quantized attrs, and the reference a cache of the wrong dtype
    b.k_scale = b.v_scale
    with pytest.raises(ValueError, match="kv_dtype"):
        run_quant_op(make_launcher(6, 2, 12, 4, "float32", "float32"), b)
    b.kv_dtype = "float8_e4m3fn"
    with pytest.raises(ValueError, match="cache"):
        run_quant_op(paged_attention, b)


@pytest.mark.slow
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("q_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("cache", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,bs", [(9, 3, 64, 16), (6, 2, 12, 4)])
def test_paged_attention_quantized_sweep(poisoned, fp8_rounding, heads, kv_heads, head_dim, bs, cache,
                                         q_dtype, rope, window, split):
    launcher = poisoned(make_quant_launcher(heads, kv_heads, head_dim, bs, q_dtype, cache,
                                            split))
    b = make_batch(heads, kv_heads, head_dim, bs, q_dtype, "float32", rope=rope, window=window,
                   seed=bs + len(q_dtype))
    check_quant_case(launcher, quantize_batch(b, cache), q_dtype, cache)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["int8", "float8_e4m3fn"])
def test_engine_with_quantized_cache_on_kernels(checkpoints, engines, fp8_rounding, tmp_path,
                                                cache):
    """A whole engine whose plan went through `quantize_kv_cache` after codegen: the rendered
    kernels (bound by the runtime, node attrs passed as at every call) give the reference
    executor's outputs."""
    import shutil

    from llm_engine.builder.passes.kv_quant import quantize_kv_cache
    from llm_engine.builder.plan import to_plan
    from llm_engine.runtime import Engine, SamplingParams
    from llm_engine.runtime.engine import EngineConfig
    from llm_engine.runtime.engine_dir import load_engine_dir
    from tests.test_kv_quant import _prompts, build_graph, calibrate

    graph, weights = build_graph(checkpoints("llama")[0], codegen=True)
    quantize_kv_cache(graph, cache, calibrate(to_plan(graph), weights, cache, _prompts(4, 1)))
    path = tmp_path / "engine"
    shutil.copytree(engines("llama"), path)
    for name, source in graph.meta["codegen"]["sources"].items():
        (path / "kernels" / f"{name}.py").write_text(source)
    files = load_engine_dir(path)
    files.plan = to_plan(graph)
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], [100, 200, 300, 10, 20, 30, 40, 50, 60]]
    outs = []
    for kernels in ("reference", "triton"):
        engine = Engine(files, EngineConfig(block_size=4, kv_cache_memory=1 << 20,
                                            kernels=kernels))
        assert engine.kernel_backend == kernels
        assert all(k.dtype == getattr(torch, cache) for k, _ in engine.cache.kv_caches)
        outs.append(engine.generate(prompts, params))
    for r, g in zip(*outs):
        assert g.token_ids == r.token_ids
        for rl, gl in zip(r.logprobs, g.logprobs):
            for k in rl:
                assert gl[k] == pytest.approx(rl[k], abs=1e-4)
