"""templates/embedding.py.j2: token embedding lookup against kernels.ops.embedding.

Tolerance: a lookup copies rows, so the result must equal the reference exactly (rel_error 0,
tighter than RTOL[dtype]: float32 1e-5, float16 2e-3, bfloat16 1.6e-2). Outputs are allocated
NaN-poisoned, so a row or column the kernel skips fails the comparison.
"""

from __future__ import annotations

import json

import pytest
import torch

from kernels import codegen, ops
from kernels.dtypes import dtype_name
from kernels.triton import embedding
from tests.triton.util import RTOL, PoisonedTorch, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _module(weight, ids, monkeypatch, *, ids_shape=None):
    p = embedding.params("embedding", {}, [tuple(weight.shape), ids_shape or tuple(ids.shape)],
                         [dtype_name(weight.dtype), dtype_name(ids.dtype)], dtype_name(weight.dtype))
    assert p is not None
    module = codegen.load_kernel(embedding.source(p, nodes=["embed"]))
    monkeypatch.setattr(module, "torch", PoisonedTorch())
    return module


def _check(weight, ids, monkeypatch, **kw):
    got = _module(weight, ids, monkeypatch, **kw).launch(weight, ids)
    want = ops.embedding(weight, ids)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_error(got, want) <= RTOL[weight.dtype]
    assert torch.equal(got, want)


def _weight(vocab, dim, dtype, device):
    return (torch.randn(vocab, dim, device=device) + 4.0).to(dtype)  # no zero entries


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("dim", [72, 100, 576])
@pytest.mark.parametrize("ids_shape", [(1,), (3,), (37,), (2, 5)])
def test_embedding_matches_reference(dtype, dim, ids_shape, device, monkeypatch):
    torch.manual_seed(dim)
    weight = _weight(100, dim, dtype, device)
    _check(weight, torch.randint(0, 100, ids_shape, device=device), monkeypatch)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=dtype_name)
def test_int32_ids_wide_rows_and_edges(id_dtype, device, monkeypatch):
    """Rows wider than one column block (1100 > 1024), the first and last ids, repeats."""
    torch.manual_seed(5)
    weight = _weight(50, 1100, torch.float16, device)
    ids = torch.tensor([[0, 49, 7], [7, 0, 49]], dtype=id_dtype, device=device)
    _check(weight, ids, monkeypatch, ids_shape=("B", "T"))


def test_non_contiguous_ids(device, monkeypatch):
    torch.manual_seed(6)
    weight = _weight(30, 72, torch.bfloat16, device)
    ids = torch.randint(0, 30, (4, 3), device=device).t()
    assert not ids.is_contiguous()
    _check(weight, ids, monkeypatch)


def test_out_of_range_ids_read_zero_rows(device, monkeypatch):
    """The reference raises; the kernel cannot, and writes zeros rather than reading past the
    table."""
    weight = _weight(10, 72, torch.float32, device)
    ids = torch.tensor([3, -1, 10, 1000], device=device)
    got = _module(weight, ids, monkeypatch).launch(weight, ids)
    assert torch.equal(got[0], weight[3])
    assert torch.equal(got[1:], torch.zeros(3, 72, device=device))


def test_empty_ids_and_launch_checks(device):
    p = embedding.params("embedding", {}, [(10, 8), ("T",)], ["float32", "int64"], "float32")
    module = codegen.load_kernel(embedding.source(p))
    weight = torch.randn(10, 8, device=device)
    assert module.launch(weight, torch.zeros(0, dtype=torch.int64, device=device)).shape == (0, 8)
    with pytest.raises(ValueError, match="table"):
        module.launch(torch.randn(11, 8, device=device), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids"):
        module.launch(weight, torch.zeros(2, dtype=torch.int32, device=device))


@pytest.mark.parametrize("args", [
    ("embedding", {}, [(10, 8), (3,)], ["float32", "float32"], "float32"),  # float ids
    ("embedding", {}, [(10, 8), (3,)], ["int8", "int64"], "int8"),  # quantised table
    ("embedding", {}, [(10, 8), (3,)], ["float64", "int64"], "float64"),
    ("embedding", {}, [("V", 8), (3,)], ["float32", "int64"], "float32"),  # symbolic table
    ("embedding", {}, [(10, 8, 2), (3,)], ["float32", "int64"], "float32"),
    ("embedding", {}, [(10, 8), (3,)], ["float32", "int64"], "float16"),  # output dtype
    ("embedding", {"padding_idx": 0}, [(10, 8), (3,)], ["float32", "int64"], "float32"),
    ("index_select", {"dim": 0}, [(10, 8), (3,)], ["float32", "int64"], "float32"),
])
def test_params_rejects(args):
    assert embedding.params(*args) is None


def test_render_is_deterministic():
    p = embedding.params("embedding", {}, [(151936, 896), ("T",)], ["bfloat16", "int64"],
                         "bfloat16")
    assert p == {"op": "embedding", "dtype": "bfloat16", "id_dtype": "int64", "vocab": 151936,
                 "dim": 896, "BLOCK": 1024, "num_warps": 4}
    again = json.loads(json.dumps(p, sort_keys=True))  # as the engine stores params
    assert embedding.source(p, nodes=["e"]) == embedding.source(again, nodes=["e"])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("dim", [1, 64, 72, 100, 576, 1000, 2048, 4096])
@pytest.mark.parametrize("tokens", [1, 3, 37, 130])
def test_embedding_sweep(dtype, dim, tokens, device, monkeypatch):
    torch.manual_seed(dim * 1000 + tokens)
    weight = _weight(257, dim, dtype, device)
    _check(weight, torch.randint(0, 257, (tokens,), device=device), monkeypatch)
