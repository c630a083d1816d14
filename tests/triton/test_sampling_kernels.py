"""Sampling kernels rendered from templates/sampling.py.j2 (greedy argmax; softmax with
temperature fused with top-k), run under the Triton interpreter (or on a GPU when there is
one) against torch.

argmax must be exact, ties included (the first index, as torch.argmax). softmax_topk: the
probabilities within RTOL[float32] (relative to the largest) of
torch.softmax(logits.float() / T, -1).topk(k), the ids exactly equal where the k + 1 largest
logits have no ties, and on ties the same probabilities with the lower index first.
"""

from __future__ import annotations

import pytest
import torch

from llm_engine.kernels import codegen
from llm_engine.kernels.triton import sampling
from tests.triton.test_gemm import compile_for_gpu, gpu_job
from tests.triton.util import RTOL, poison, rel_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    empty = torch.empty

    def poisoned(*args, **kwargs):
        return poison(empty(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", poisoned)


def kernel(op, attrs, logits, out, **override):
    p = sampling.params(op, attrs, [tuple(logits.shape)], [str(logits.dtype).split(".")[1]],
                        out)
    assert p is not None
    p.update(override)
    return codegen.load_kernel(sampling.source(p))


def topk_logits(rows, V, k, dtype, device, seed=0):
    """Random logits whose k + 1 largest are distinct in every dtype (steps of 0.25 from 4,
    exact in bf16 up to 32) and above the rest (in [-3, 3], ties allowed there): the top-k
    ids are then well defined."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=g).clamp(-3, 3)
    n = min(k + 1, V)
    for r in range(rows):
        x[r, torch.randperm(V, generator=g)[:n]] = 4 + 0.25 * torch.arange(n, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- argmax

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,V,BLOCK_V", [(1, 100, 32), (3, 1000, 128), (37, 130, 64),
                                            (4, 5000, None)])
def test_argmax(rows, V, BLOCK_V, dtype, device):
    torch.manual_seed(rows * V)
    x = torch.randn(rows, V).to(device=device, dtype=dtype)
    override = {} if BLOCK_V is None else {"BLOCK_V": BLOCK_V}
    mod = kernel("argmax", {}, x, "int64", **override)
    got = mod.launch(x)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, torch.argmax(x, dim=-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_ties_and_specials(dtype, device):
    V = 300
    x = torch.randn(9, V).to(dtype)
    x[0, [5, 70, 299]] = 9.0  # tie across chunks: the first wins
    x[1, [64, 65]] = 9.0  # tie inside a chunk
    x[2] = 1.0  # all equal -> 0
    x[3] = -float("inf")  # all -inf -> 0
    x[4, 100:] = float("inf")
    x[4, 200] = float("nan")  # NaN ranks above +inf, as in torch
    x[5, [17, 250]] = float("nan")  # the first NaN
    x[6, :] = -0.0
    x[6, 3] = 0.0  # -0.0 == 0.0: the first of them
    x[7, 299] = 50.0  # the last element
    x[8, [0, 299]] = 50.0
    x = x.to(device)
    mod = kernel("argmax", {}, x, "int64", BLOCK_V=64)
    assert torch.equal(mod.launch(x), torch.argmax(x, dim=-1)), torch.argmax(x, dim=-1)


def test_argmax_shapes_and_cache(device):
    x = torch.randn(2, 3, 77, device=device)
    assert torch.equal(sampling.argmax(x), torch.argmax(x, dim=-1))
    v = torch.randn(77, device=device)
    got = sampling.argmax(v)
    assert got.shape == () and got.item() == torch.argmax(v).item()
    assert sampling.argmax(x[:, :, ::1].transpose(0, 1)).shape == (3, 2)  # strided rows
    assert sampling._module.cache_info().hits >= 2  # one rendered module for V=77 fp32
    assert sampling.argmax(torch.empty(0, 77, device=device)).shape == (0,)


# ----------------------------------------------------------------------------- softmax_topk

def check_topk(x, t, k, probs, ids):
    want_p, want_i = sampling.softmax_topk_reference(x, t, k)
    assert probs.dtype == torch.float32 and ids.dtype == torch.int64
    assert probs.shape == ids.shape == want_p.shape
    assert rel_error(probs, want_p) <= RTOL[torch.float32]
    full = torch.softmax(x.float() / sampling_temp(t, x), dim=-1)
    # the ids name the probabilities returned (robust to ties)
    assert rel_error(full.gather(-1, ids), probs) <= RTOL[torch.float32]
    assert (probs[..., :-1] >= probs[..., 1:]).all()
    return want_i


def sampling_temp(t, x):
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.reshape(*t.shape, *([1] * (x.dim() - t.dim()))) if t.dim() else t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,V,k,BLOCK_V,t", [(1, 100, 1, 32, 1.0), (2, 300, 5, 128, 0.7),
                                                (2, 130, 16, 64, 1.0), (3, 37, 37, 64, 2.0)])
def test_softmax_topk(rows, V, k, BLOCK_V, t, dtype, device):
    x = topk_logits(rows, V, k, dtype, device, seed=V + k)
    mod = kernel("softmax_topk", {"k": k}, x, "float32", BLOCK_V=BLOCK_V)
    probs, ids = mod.launch(x, t)
    assert torch.equal(ids, check_topk(x, t, k, probs, ids))


def test_softmax_topk_random_and_per_row_temperature(device):
    torch.manual_seed(0)
    x = torch.randn(4, 500, device=device) * 3
    t = torch.tensor([0.5, 1.0, 1.5, 3.0], device=device)
    probs, ids = sampling.softmax_topk(x, t, 8)
    assert torch.equal(ids, check_topk(x, t, 8, probs, ids))
    # leading dims, and the launch keyword the node form passes
    x3 = x.reshape(2, 2, 500)
    probs3, ids3 = sampling.softmax_topk(x3, 1.3, 3)
    assert probs3.shape == ids3.shape == (2, 2, 3)
    check_topk(x3, 1.3, 3, probs3, ids3)


def test_softmax_topk_ties_and_masked_vocab(device):
    V = 200
    x = torch.full((3, V), -float("inf"))
    x[0, [3, 60, 150]] = 2.0  # only 3 finite logits, k = 5: then -inf ones at probability 0
    x[1] = 0.5  # all tied: the lowest ids
    x[2] = torch.randn(V)
    x[2, [10, 90, 190]] = 7.0  # a three-way tie at the top, across chunks
    x = x.to(device)
    mod = kernel("softmax_topk", {"k": 5}, x, "float32", BLOCK_V=64)
    probs, ids = mod.launch(x, 1.0)
    check_topk(x, 1.0, 5, probs, ids)
    assert ids[0, :3].tolist() == [3, 60, 150] and probs[0, 3:].eq(0).all()
    assert ids[1].tolist() == [0, 1, 2, 3, 4]
    assert ids[2, :3].tolist() == [10, 90, 190]


def test_params_checker():
    P = sampling.params
    assert P("argmax", {}, [("T", 1000)], ["bfloat16"], "int64")["V"] == 1000
    assert P("argmax", {"dim": 1}, [(4, 1000)], ["float16"], "int64") is not None
    assert P("argmax", {"dim": 0}, [(4, 1000)], ["float16"], "int64") is None
    assert P("argmax", {}, [(4, "T")], ["float16"], "int64") is None
    assert P("argmax", {}, [(4, 1000)], ["int64"], "int64") is None
    assert P("argmax", {"keepdim": True}, [(4, 1000)], ["float32"], "int64") is None
    p = P("softmax_topk", {"k": 50}, [("N", 151936), ()], ["float32", "float32"], "float32")
    assert p["k"] == 50 and p["BLOCK_V"] >= 64
    for k in (0, 1001, True, 2.0):
        assert P("softmax_topk", {"k": k}, [(4, 1000)], ["float32"], "float32") is None
    assert P("softmax_topk", {}, [(4, 1000)], ["float32"], "float32") is None
    assert P("softmax", {"k": 5}, [(4, 1000)], ["float32"], "float32") is None
    p = P("softmax_topk", {"k": 3}, [(4, 100)], ["float32"], "float32")
    assert sampling.source(p) == sampling.source(dict(reversed(list(p.items()))))


def test_compiles_for_gpu():
    """Both kernels compile for sm_90 (a small top-k here; the GPU sizes in the slow sweep)."""
    x = torch.randn(2, 5000, dtype=torch.bfloat16)
    pa = sampling.params("argmax", {}, [tuple(x.shape)], ["bfloat16"], "int64")
    pt = sampling.params("softmax_topk", {"k": 5}, [tuple(x.shape)], ["bfloat16"], "float32")
    pa.update(BLOCK_V=sampling.block_v(5000, 1, "cuda"), num_warps=8)
    pt.update(BLOCK_V=1024, num_warps=8)
    jobs = [gpu_job(sampling.source(pa), x), gpu_job(sampling.source(pt), x, 0.8)]
    assert len(compile_for_gpu(jobs)) == 2


# ----------------------------------------------------------------------------- slow sweeps

@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 2, 63, 64, 65, 1000, 32000])
@pytest.mark.parametrize("BLOCK_V", [16, 256, None])
def test_argmax_sweep(V, BLOCK_V, dtype, device):
    if BLOCK_V and V > 256 * BLOCK_V:
        pytest.skip("too many chunks for the interpreter")
    torch.manual_seed(V)
    x = torch.randn(5, V).to(device=device, dtype=dtype)
    x[0, V // 2:] = x[0].max()  # ties in the second half
    override = {} if BLOCK_V is None else {"BLOCK_V": BLOCK_V}
    mod = kernel("argmax", {}, x, "int64", **override)
    assert torch.equal(mod.launch(x), torch.argmax(x, dim=-1))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,k", [(2, 1), (2, 2), (64, 64), (65, 64), (1000, 50), (3000, 7),
                                 (32000, 20)])
@pytest.mark.parametrize("BLOCK_V", [64, 1024, None])
def test_softmax_topk_sweep(V, k, BLOCK_V, dtype, device):
    if BLOCK_V and V > 64 * BLOCK_V:
        pytest.skip("too many chunks for the interpreter")
    x = topk_logits(3, V, k, dtype, device, seed=V * k)
    override = {} if BLOCK_V is None else {"BLOCK_V": max(BLOCK_V, 1 << (k - 1).bit_length())}
    mod = kernel("softmax_topk", {"k": k}, x, "float32", **override)
    probs, ids = mod.launch(x, 0.9)
    assert torch.equal(ids, check_topk(x, 0.9, k, probs, ids))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves")
def test_compile_sweep():
    """The GPU block sizes compile for sm_90: argmax in each dtype, top-k for k from 1 to the
    largest allowed (bf16), and one top-k per dtype also for sm_80."""
    V, jobs = 151936, []
    for dtype in DTYPES:
        name = str(dtype).split(".")[1]
        x = torch.zeros(2, V, dtype=dtype)
        for k in (1, 5, 50, 1024) if dtype == torch.bfloat16 else (50,):
            p = sampling.params("softmax_topk", {"k": k}, [(2, V)], [name], "float32")
            p.update(BLOCK_V=sampling.block_v(V, k, "cuda"), num_warps=8)
            archs = (90,) if dtype == torch.bfloat16 else (80, 90)
            jobs.append(gpu_job(sampling.source(p), x, 1.0, archs=archs))
        p = sampling.params("argmax", {}, [(2, V)], [name], "int64")
        p.update(BLOCK_V=sampling.block_v(V, 1, "cuda"), num_warps=8)
        jobs.append(gpu_job(sampling.source(p), x, archs=(80, 90)))
    assert len(compile_for_gpu(jobs)) == sum(len(j["archs"]) for j in jobs)
