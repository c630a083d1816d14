"""templates/gated_act.py.j2: act(gate) * up against kernels.ops.gated_act.

Tolerance: rel_error (max |got - want| / max |want|) <= RTOL[dtype]: float32 1e-5, float16
2e-3, bfloat16 1.6e-2. The kernel rounds act(gate) to the input dtype before the product, as the
reference's two torch ops do, so 16-bit results agree to within an ulp. Outputs are allocated
NaN-poisoned.

The Triton interpreter casts float32 -> bfloat16 by truncation, where compiled Triton (and
torch) round to nearest even; tests/triton/conftest.py makes the interpreter round like the hardware,
so bfloat16 results measure the kernel rather than the simulator.
"""

from __future__ import annotations

import json

import pytest
import torch

from llm_engine.kernels import codegen, ops
from llm_engine.kernels.dtypes import dtype_name
from llm_engine.kernels.triton import gated_act
from tests.triton.util import RTOL, PoisonedTorch, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(act, x, monkeypatch, *, shape=None):
    dtype = dtype_name(x.dtype)
    p = gated_act.params("gated_act", {"act": act}, [shape or tuple(x.shape)], [dtype], dtype)
    assert p is not None
    module = codegen.load_kernel(gated_act.source(p, nodes=["gated"]))
    monkeypatch.setattr(module, "torch", PoisonedTorch())
    got = module.launch(x, act=act)
    want = ops.gated_act(x, act=act)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = rel_error(got, want)
    assert err <= RTOL[x.dtype], f"{act} {x.dtype}: rel_error {err:.3g} > {RTOL[x.dtype]}"
    return p


def _x(shape, dtype, device):
    return (2 * torch.randn(shape, device=device)).to(dtype)  # gate spans the act's bend


@pytest.mark.parametrize("act", gated_act.ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("rows,width", [(1, 72), (3, 200), (37, 576)])
def test_gated_act_matches_reference(act, dtype, rows, width, device, monkeypatch):
    torch.manual_seed(rows * 1000 + width)
    p = _check(act, _x((rows, width), dtype, device), monkeypatch)
    assert p["inter"] == width // 2


def test_wide_rows_use_column_blocks(device, monkeypatch):
    """An intermediate size over the column block (1100 > 1024): two programs per row."""
    torch.manual_seed(3)
    p = _check("silu", _x((3, 2200), torch.float16, device), monkeypatch)
    assert p["BLOCK"] == 1024


def test_leading_dims_symbolic_and_non_contiguous(device, monkeypatch):
    torch.manual_seed(4)
    x = _x((144, 2, 5), torch.bfloat16, device).permute(1, 2, 0)  # [2, 5, 144]
    assert not x.is_contiguous()
    _check("gelu_tanh", x, monkeypatch, shape=("B", "T", 144))


def test_empty_and_launch_checks(device):
    p = gated_act.params("gated_act", {"act": "relu"}, [("T", 8)], ["float32"], "float32")
    module = codegen.load_kernel(gated_act.source(p))
    assert module.launch(torch.randn(0, 8, device=device), act="relu").shape == (0, 4)
    with pytest.raises(ValueError, match="act"):
        module.launch(torch.randn(2, 8, device=device), act="silu")
    with pytest.raises(ValueError, match="rendered for"):
        module.launch(torch.randn(2, 6, device=device), act="relu")


@pytest.mark.parametrize("args", [
    ("gated_act", {"act": "tanh"}, [(3, 8)], ["float32"], "float32"),  # unknown act
    ("gated_act", {"act": "silu", "limit": 7.0}, [(3, 8)], ["float32"], "float32"),
    ("gated_act", {}, [(3, 8)], ["float32"], "float32"),
    ("gated_act", {"act": "silu"}, [(3, 7)], ["float32"], "float32"),  # odd width
    ("gated_act", {"act": "silu"}, [(3, "I2")], ["float32"], "float32"),  # symbolic width
    ("gated_act", {"act": "silu"}, [(3, 8)], ["float64"], "float64"),
    ("gated_act", {"act": "silu"}, [(3, 8)], ["int32"], "int32"),
    ("gated_act", {"act": "silu"}, [(3, 8)], ["float16"], "float32"),  # output dtype differs
    ("gated_act", {"act": "silu"}, [(3, 8), (3, 8)], ["float32"] * 2, "float32"),
    ("silu", {}, [(3, 8)], ["float32"], "float32"),
])
def test_params_rejects(args):
    assert gated_act.params(*args) is None


def test_render_is_deterministic():
    p = gated_act.params("gated_act", {"act": "gelu"}, [("T", 17920)], ["bfloat16"], "bfloat16")
    assert p == {"op": "gated_act", "act": "gelu", "dtype": "bfloat16", "inter": 8960,
                 "BLOCK": 1024, "num_warps": 4}
    again = json.loads(json.dumps(p, sort_keys=True))  # as the engine stores params
    assert gated_act.source(p, nodes=["a"]) == gated_act.source(again, nodes=["a"])
    assert "_tanh" not in gated_act.source(p)  # only gelu_tanh needs the tanh helper


@pytest.mark.slow
@pytest.mark.parametrize("act", gated_act.ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("rows", [1, 3, 37, 130])
@pytest.mark.parametrize("width", [2, 72, 100, 576, 1000, 2200, 5000])
def test_gated_act_sweep(act, dtype, rows, width, device, monkeypatch):
    torch.manual_seed(rows * 10000 + width)
    _check(act, _x((rows, width), dtype, device), monkeypatch)
