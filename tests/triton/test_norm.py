"""templates/norm.py.j2: rms_norm, layer_norm and the residual-add fusions against kernels.ops.

Tolerance: rel_error (max |got - want| / max |want|) <= RTOL[dtype] of each output's dtype:
float32 1e-5, float16 2e-3, bfloat16 1.6e-2; where the op rounds through a narrower dtype on the
way (rms_norm rounds the normalised value to x's dtype before a float32 w scales it) the RTOL of
that dtype, since one ulp of it is where a kernel and torch may differ. The fused residual sum must match bit for bit
(the kernel rounds it exactly as torch does). Outputs are allocated NaN-poisoned, so an element
the kernel skips fails.

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
from llm_engine.kernels.triton import norm
from tests.triton.util import RTOL, PoisonedTorch, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(op: str, shape: tuple, dtype, w_dtype, device, *, bias=True) -> list[torch.Tensor]:
    hidden = shape[-1]
    x = torch.randn(shape, device=device).to(dtype)
    xs = [x]
    if op.startswith("add_"):
        xs.append(torch.randn(shape, device=device).to(dtype))
    xs.append((torch.rand(hidden, device=device) + 0.5).to(w_dtype))  # non-zero weights
    if op.endswith("layer_norm") and bias:
        xs.append(torch.randn(hidden, device=device).to(w_dtype))
    return xs


def _check(op, xs, eps, monkeypatch, *, shapes=None):
    """Render for these inputs, run, compare every output with the reference."""
    want = ops.OPS[op].fn(*xs, eps=eps)
    wants = list(want) if isinstance(want, tuple) else [want]
    out_dtype = [dtype_name(w.dtype) for w in wants]
    p = norm.params(op, {"eps": eps}, shapes or [tuple(x.shape) for x in xs],
                    [dtype_name(x.dtype) for x in xs], out_dtype if len(wants) > 1 else out_dtype[0])
    assert p is not None
    module = codegen.load_kernel(norm.source(p, nodes=[f"{op}_node"]))
    monkeypatch.setattr(module, "torch", PoisonedTorch())
    got = module.launch(*xs, eps=eps)
    gots = list(got) if isinstance(got, tuple) else [got]
    assert len(gots) == len(wants)
    rounded_through = getattr(torch, p["norm_dtype"])
    for g, w in zip(gots, wants):
        assert g.shape == w.shape and g.dtype == w.dtype and g.device == w.device
        tol = max(RTOL[w.dtype], RTOL[rounded_through])
        err = rel_error(g, w)
        assert err <= tol, f"{op} {w.dtype}: rel_error {err:.3g} > {tol}"
    if len(gots) == 2:
        assert torch.equal(gots[1], wants[1]), "the residual sum must round exactly as torch"
    return p


@pytest.mark.parametrize("op", norm.OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("rows,hidden", [(1, 72), (3, 100), (37, 576)])
def test_norm_matches_reference(op, dtype, rows, hidden, device, monkeypatch):
    torch.manual_seed(rows * 1000 + hidden)
    p = _check(op, _inputs(op, (rows, hidden), dtype, dtype, device), 1e-5, monkeypatch)
    assert p["BLOCK"] == 1 << (hidden - 1).bit_length()


@pytest.mark.parametrize("op,x_dtype,w_dtype", [
    ("rms_norm", torch.bfloat16, torch.float32),   # output promotes to float32
    ("rms_norm", torch.float32, torch.float16),
    ("add_rms_norm", torch.float16, torch.float32),
    ("layer_norm", torch.float16, torch.float32),  # float32 params, 16-bit activations
    ("add_layer_norm", torch.bfloat16, torch.float32),
])
def test_mixed_dtypes(op, x_dtype, w_dtype, device, monkeypatch):
    torch.manual_seed(0)
    p = _check(op, _inputs(op, (5, 100), x_dtype, w_dtype, device), 1e-6, monkeypatch)
    assert p["w_dtype"] == dtype_name(w_dtype)


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_layer_norm_without_bias(op, device, monkeypatch):
    torch.manual_seed(1)
    xs = _inputs(op, (3, 72), torch.float16, torch.float16, device, bias=False)
    p = _check(op, xs, 1e-5, monkeypatch)
    assert p["has_bias"] is False
    module = codegen.load_kernel(norm.source(p))
    assert module.launch(*xs, None, eps=1e-5) is not None  # b=None, as the reference takes it
    with pytest.raises(ValueError, match="bias"):
        module.launch(*xs, xs[-1], eps=1e-5)


def test_leading_dims_symbolic_shape_and_strides(device, monkeypatch):
    """Params from a symbolic shape; a 3-d, non-contiguous input at launch."""
    torch.manual_seed(2)
    x = torch.randn(100, 2, 3, device=device).to(torch.float16).permute(1, 2, 0)  # [2, 3, 100]
    r = torch.randn(2, 3, 100, device=device).to(torch.float16)
    w = (torch.rand(100, device=device) + 0.5).to(torch.float16)
    assert not x.is_contiguous()
    _check("add_rms_norm", [x, r, w], 1e-6, monkeypatch,
           shapes=[("B", "T", 100), ("B", "T", 100), (100,)])


def test_empty_rows(device):
    p = norm.params("rms_norm", {"eps": 1e-6}, [("T", 72), (72,)], ["float32", "float32"],
                    "float32")
    module = codegen.load_kernel(norm.source(p))
    y = module.launch(torch.randn(0, 72, device=device), torch.ones(72, device=device), eps=1e-6)
    assert y.shape == (0, 72)


def test_launch_rejects_other_eps_or_shape(device):
    p = norm.params("rms_norm", {"eps": 1e-6}, [(3, 72), (72,)], ["float32", "float32"],
                    "float32")
    module = codegen.load_kernel(norm.source(p))
    x, w = torch.randn(3, 72, device=device), torch.ones(72, device=device)
    with pytest.raises(ValueError, match="eps"):
        module.launch(x, w, eps=1e-5)
    with pytest.raises(ValueError, match="hidden"):
        module.launch(torch.randn(3, 64, device=device), torch.ones(64, device=device), eps=1e-6)
    with pytest.raises(TypeError, match="dtypes"):
        module.launch(x.half(), w.half(), eps=1e-6)


@pytest.mark.parametrize("args", [
    ("rms_norm", {"eps": 1e-6}, [(3, "H"), ("H",)], ["float32"] * 2, "float32"),  # symbolic hidden
    ("rms_norm", {"eps": 1e-6}, [(3, 72), (64,)], ["float32"] * 2, "float32"),  # w mismatch
    ("rms_norm", {"eps": 1e-6}, [(3, 72), (72,)], ["float64"] * 2, "float64"),  # float64
    ("rms_norm", {"eps": 1e-6}, [(3, 72), (72,)], ["int32"] * 2, "int32"),
    ("rms_norm", {"eps": 1e-6}, [(3, 72), (72,)], ["float16"] * 2, "float32"),  # wrong out dtype
    ("rms_norm", {"eps": 1e-6, "scale": 2}, [(3, 72), (72,)], ["float32"] * 2, "float32"),
    ("rms_norm", {}, [(3, 72), (72,)], ["float32"] * 2, "float32"),  # no eps
    ("rms_norm", {"eps": 1e-6}, [(3, 72), (72,), (72,)], ["float32"] * 3, "float32"),  # arity
    ("rms_norm", {"eps": 1e-6}, [(3, 1 << 17), (1 << 17,)], ["float32"] * 2, "float32"),  # too wide
    ("layer_norm", {"eps": 1e-5}, [(3, 72), (72,)], ["float32", "bfloat16"], "float32"),
    ("layer_norm", {"eps": 1e-5}, [(3, 72), (72,), (72,)], ["float16", "float32", "float16"],
     "float16"),  # w and b of different dtypes
    ("add_rms_norm", {"eps": 1e-6}, [(3, 72), (1, 72), (72,)], ["float32"] * 3,
     ["float32", "float32"]),  # broadcast residual
    ("add_rms_norm", {"eps": 1e-6}, [(3, 72), (3, 72), (72,)], ["float32"] * 3, "float32"),
    ("softmax", {"dim": -1}, [(3, 72)], ["float32"], "float32"),
])
def test_params_rejects(args):
    assert norm.params(*args) is None


def test_render_is_deterministic():
    p = norm.params("add_layer_norm", {"eps": 1e-5}, [("T", 576), ("T", 576), (576,), (576,)],
                    ["bfloat16", "bfloat16", "float32", "float32"], ["bfloat16", "bfloat16"])
    assert p == {"op": "add_layer_norm", "kind": "layer", "has_residual": True,
                 "has_bias": True, "eps": 1e-5, "hidden": 576, "x_dtype": "bfloat16",
                 "residual_dtype": "bfloat16", "w_dtype": "float32", "b_dtype": "float32",
                 "norm_dtype": "bfloat16", "out_dtype": "bfloat16", "BLOCK": 1024,
                 "num_warps": 4}
    src = norm.source(p, nodes=["n"])
    assert src == norm.source(json.loads(json.dumps(p, sort_keys=True)), nodes=["n"])
    assert src.startswith("# Generated by llm-engine from templates/norm.py.j2")
    assert '"""add_layer_norm: LayerNorm' in src


@pytest.mark.slow
@pytest.mark.parametrize("op", norm.OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("rows", [1, 3, 37, 130])
@pytest.mark.parametrize("hidden", [1, 64, 72, 100, 576, 1000, 2048, 4096])
def test_norm_sweep(op, dtype, rows, hidden, device, monkeypatch):
    torch.manual_seed(rows * 10000 + hidden)
    _check(op, _inputs(op, (rows, hidden), dtype, dtype, device), 1e-6, monkeypatch)
