"""templates/embedding.py.j2: token embedding lookup against kernels.ops.embedding.

Tolerance: a lookup copies rows, so the result must equal the reference exactly (rel_error 0,
tighter than RTOL[dtype]: float32 1e-5, float16 2e-3, bfloat16 1.6e-2). The int8 table
("int8_channel") must also match exactly: its one float32 product q * scale per element is
the reference's. Outputs are allocated NaN-poisoned, so a row or column the kernel skips fails
the comparison.
"""

from __future__ import annotations

import json

import pytest
import torch

from llm_engine.kernels import codegen, ops
from llm_engine.kernels import quant as Q
from llm_engine.kernels.dtypes import dtype_name
from llm_engine.kernels.triton import embedding
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


# ---- int8 table (b_format "int8_channel") --------------------------------------------------

INT8 = {"b_format": "int8_channel"}


def _int8_table(vocab, dim, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, dim, generator=gen) * torch.logspace(-3, 1, vocab)[:, None]
    w[1] = 0.0  # a zero row: scale 1
    q, scale = Q.quantize_int8_channel(w)
    return q.to(device), scale.to(device)


def _int8_module(q, ids, monkeypatch, ids_shape=None, attrs=INT8):
    out = attrs.get("dtype", "float32")
    p = embedding.params("embedding", attrs, [tuple(q.shape), ids_shape or tuple(ids.shape),
                                              (q.shape[0],)],
                         ["int8", dtype_name(ids.dtype), "float32"], out)
    assert p is not None and p["b_format"] == "int8_channel" and p["out_dtype"] == out
    module = codegen.load_kernel(embedding.source(p, nodes=["embed"]))
    monkeypatch.setattr(module, "torch", PoisonedTorch())
    return module


@pytest.mark.parametrize("dim", [72, 576, 1100])
@pytest.mark.parametrize("ids_shape", [(1,), (37,), (2, 5)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=dtype_name)
def test_int8_table_matches_reference(dim, ids_shape, id_dtype, device, monkeypatch):
    torch.manual_seed(dim)
    q, scale = _int8_table(100, dim, device, seed=dim)
    ids = torch.randint(0, 100, ids_shape, device=device, dtype=id_dtype)
    ids.view(-1)[0] = 1  # the zero row
    got = _int8_module(q, ids, monkeypatch).launch(q, ids, scale, **INT8)
    want = ops.embedding(q, ids, scale, **INT8)
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
    assert torch.equal(got, Q.dequantize_int8_channel(q, scale)[ids])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_int8_table_with_output_dtype(dtype, device, monkeypatch):
    """The node attribute "dtype": rows computed in float32 and rounded once to it."""
    q, scale = _int8_table(60, 100, device, seed=7)
    ids = torch.randint(0, 60, (2, 9), device=device)
    attrs = {**INT8, "dtype": dtype_name(dtype)}
    module = _int8_module(q, ids, monkeypatch, attrs=attrs)
    got = module.launch(q, ids, scale, **attrs)
    want = ops.embedding(q, ids, scale, **attrs)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(got, (Q.dequantize_int8_channel(q, scale)[ids]).to(dtype))
    with pytest.raises(ValueError, match="dtype"):
        module.launch(q, ids, scale, **{**INT8, "dtype": "float64"})


def test_int8_table_edges_and_checks(device, monkeypatch):
    q, scale = _int8_table(10, 72, device)
    ids = torch.tensor([3, -1, 10, 9], device=device)
    module = _int8_module(q, ids, monkeypatch, ids_shape=("T",))
    got = module.launch(q, ids, scale)
    assert torch.equal(got[0], q[3].float() * scale[3])
    assert torch.equal(got[3], q[9].float() * scale[9])
    assert torch.equal(got[1:3], torch.zeros(2, 72, device=device))  # out of range: zeros
    assert module.launch(q, ids[:0], scale).shape == (0, 72)
    with pytest.raises(ValueError, match="int8 table"):
        module.launch(q.float(), ids, scale)
    with pytest.raises(ValueError, match="scale"):
        module.launch(q, ids, scale.half())
    with pytest.raises(ValueError, match="scale"):
        module.launch(q, ids, scale[:5])
    with pytest.raises(ValueError, match="b_format"):
        module.launch(q, ids, scale, b_format="dense")
    with pytest.raises(ValueError, match="ids"):
        module.launch(q, ids.int(), scale)


@pytest.mark.parametrize("args", [
    (INT8, [(10, 8), (3,), (10,)], ["int8", "int64", "float32"], "float16"),  # out dtype
    ({**INT8, "dtype": "float16"}, [(10, 8), (3,), (10,)], ["int8", "int64", "float32"],
     "float32"),  # the attribute and the node's dtype disagree
    ({**INT8, "dtype": "float64"}, [(10, 8), (3,), (10,)], ["int8", "int64", "float32"],
     "float64"),
    ({**INT8, "padding_idx": 0}, [(10, 8), (3,), (10,)], ["int8", "int64", "float32"],
     "float32"),
    ({"dtype": "float32"}, [(10, 8), (3,)], ["float32", "int64"], "float32"),
    (INT8, [(10, 8), (3,), (10,)], ["int8", "int64", "float16"], "float32"),  # scale dtype
    (INT8, [(10, 8), (3,), (8,)], ["int8", "int64", "float32"], "float32"),  # scale shape
    (INT8, [(10, 8), (3,), (10,)], ["uint8", "int64", "float32"], "float32"),
    (INT8, [(10, 8), (3,), (10,)], ["float32", "int64", "float32"], "float32"),
    (INT8, [(10, 8), (3,)], ["int8", "int64"], "float32"),  # no scale
    (INT8, [(10, 8), (3,), (10,)], ["int8", "float32", "float32"], "float32"),  # float ids
    (INT8, [("V", 8), (3,), ("V",)], ["int8", "int64", "float32"], "float32"),
    ({"b_format": "int4_group"}, [(10, 4), (3,), (10,)], ["uint8", "int64", "float32"],
     "float32"),
    ({"b_format": "dense"}, [(10, 8), (3,)], ["float32", "int64"], "float32"),
    ({}, [(10, 8), (3,), (10,)], ["float32", "int64", "float32"], "float32"),  # 3 inputs
])
def test_int8_params_rejects(args):
    assert embedding.params("embedding", *args) is None


def test_int8_render_is_deterministic():
    p = embedding.params("embedding", INT8, [(49152, 576), ("T",), (49152,)],
                         ["int8", "int64", "float32"], "float32")
    assert p == {"op": "embedding", "dtype": "int8", "id_dtype": "int64", "vocab": 49152,
                 "dim": 576, "BLOCK": 1024, "num_warps": 4, "b_format": "int8_channel",
                 "out_dtype": "float32"}
    again = json.loads(json.dumps(p, sort_keys=True))
    src = embedding.source(p, nodes=["e"])
    assert src == embedding.source(again, nodes=["e"])
    assert "def launch(q, ids, scale, **attrs)" in src


@pytest.mark.slow
@pytest.mark.parametrize("dim", [1, 64, 100, 2048])
@pytest.mark.parametrize("tokens", [1, 37, 130])
def test_int8_table_sweep(dim, tokens, device, monkeypatch):
    q, scale = _int8_table(257, dim, device, seed=dim + tokens)
    ids = torch.randint(0, 257, (tokens,), device=device)
    got = _int8_module(q, ids, monkeypatch).launch(q, ids, scale, **INT8)
    assert torch.equal(got, ops.embedding(q, ids, scale, **INT8))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("dim", [1, 64, 72, 100, 576, 1000, 2048, 4096])
@pytest.mark.parametrize("tokens", [1, 3, 37, 130])
def test_embedding_sweep(dtype, dim, tokens, device, monkeypatch):
    torch.manual_seed(dim * 1000 + tokens)
    weight = _weight(257, dim, dtype, device)
    _check(weight, torch.randint(0, 257, (tokens,), device=device), monkeypatch)
