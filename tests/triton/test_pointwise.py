"""templates/pointwise.py.j2: fused expression trees and lone elementwise ops against
kernels.ops (kernels.pointwise.eval_expr for the trees).

Tolerance: rel_error (max |got - want| / max |want|) <= RTOL[dtype] (float32 1e-5, float16 2e-3,
bfloat16 1.6e-2) of the least precise float dtype the reference computes in: the output's, the
inputs', and any to_dtype target inside the tree. The reference rounds every intermediate to its
tensor's dtype; the kernel computes in float32 and rounds once (plus explicit to_dtype casts), so
the two differ by the reference's accumulated rounding, a few ulps of that dtype. Outputs are
allocated NaN-poisoned, so an element the kernel skips fails.

The Triton interpreter casts float32 -> bfloat16 by truncation, where compiled Triton (and
torch) round to nearest even; tests/triton/conftest.py makes the interpreter round like the hardware,
so bfloat16 results measure the kernel rather than the simulator.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from llm_engine.kernels import codegen, ops
from llm_engine.kernels.dtypes import dtype_name
from llm_engine.kernels.triton import pointwise as pw
from tests.triton.util import RTOL, PoisonedTorch, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---- expression trees ----------------------------------------------------------------------
def inp(i: int) -> dict:
    return {"in": i}


def const(c: float) -> dict:
    return {"const": c}


def node(op: str, *args: dict, **attrs) -> dict:
    return {"op": op, "args": list(args), **attrs}


def _cast_targets(e: dict) -> set[str]:
    if "op" not in e:
        return set()
    own = {e["dtype"]} if e["op"] == "to_dtype" else set()
    return own.union(*(_cast_targets(a) for a in e["args"]))


def _module(op, attrs, xs, monkeypatch, *, shapes=None, out_dtype=None):
    p = pw.params(op, attrs, shapes or [tuple(x.shape) for x in xs],
                  [dtype_name(x.dtype) for x in xs], out_dtype)
    assert p is not None, f"params() refused {op} {attrs}"
    module = codegen.load_kernel(pw.source(p, nodes=[f"{op}_node"]))
    monkeypatch.setattr(module, "torch", PoisonedTorch())
    return p, module


def _check(op, attrs, xs, monkeypatch, *, shapes=None):
    """Render for these inputs, run, compare with the reference; returns the params."""
    want = ops.OPS[op].fn(*xs, **attrs)
    p, module = _module(op, attrs, xs, monkeypatch, shapes=shapes, out_dtype=dtype_name(want.dtype))
    got = module.launch(*xs, **attrs)
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    floats = {dtype_name(want.dtype)} | {dtype_name(x.dtype) for x in xs if x.is_floating_point()}
    if op == "pointwise":
        floats |= _cast_targets(attrs["expr"])
    tol = max(RTOL[getattr(torch, d)] for d in floats)
    err = rel_error(got, want)
    assert err <= tol, f"{op} {attrs}: rel_error {err:.3g} > {tol}"
    return p


def _randn(shape, dtype, device):
    return torch.randn(shape, device=device).to(dtype)


def _positive(shape, dtype, device):
    return (torch.rand(shape, device=device) + 0.5).to(dtype)  # for log, sqrt, pow, division


POSITIVE_DOMAIN = {"rsqrt", "sqrt", "log", "log1p", "reciprocal"}


# ---- lone elementwise ops ------------------------------------------------------------------
@pytest.mark.parametrize("op", sorted(ops.UNARY))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_unary_op(op, dtype, device, monkeypatch):
    torch.manual_seed(len(op))
    make = _positive if op in POSITIVE_DOMAIN else _randn
    p = _check(op, {}, [2 * make((37, 100), dtype, device)], monkeypatch)
    assert p["expr"] == node(op, inp(0))


@pytest.mark.parametrize("op", sorted(ops.BINARY))
@pytest.mark.parametrize("form", ["tensors", "scalar", "scalar_first"])
def test_binary_op(op, form, device, monkeypatch):
    torch.manual_seed(len(op))
    dtype = torch.float16
    make = _positive if op in ("div", "pow") else _randn
    a = make((3, 72), dtype, device)
    if form == "tensors":
        xs, attrs = [a, make((72,), dtype, device)], {}  # the second is a weight-like vector
    else:
        xs, attrs = [a], {"scalar": 1.5, "scalar_first": form == "scalar_first"}
    if op in ("maximum", "minimum") and form != "tensors":  # torch takes no scalar there
        assert pw.params(op, attrs, [(3, 72)], ["float16"], "float16") is None
        return
    _check(op, attrs, xs, monkeypatch)


@pytest.mark.parametrize("src,dst", [("float32", "bfloat16"), ("bfloat16", "float32"),
                                     ("float16", "bfloat16"), ("int64", "float32"),
                                     ("bool", "float16")])
def test_to_dtype(src, dst, device, monkeypatch):
    torch.manual_seed(7)
    x = (10 * torch.randn(5, 37, device=device)).to(getattr(torch, src))
    _check("to_dtype", {"dtype": dst}, [x], monkeypatch)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate, device, monkeypatch):
    torch.manual_seed(8)
    _check("gelu", {"approximate": approximate}, [_randn((3, 576), torch.bfloat16, device)],
           monkeypatch)


# ---- fused trees ---------------------------------------------------------------------------
GELU_NEW = node("mul", node("mul", const(0.5), inp(0)), node("add", const(1.0), node(
    "tanh", node("mul", const(math.sqrt(2 / math.pi)), node(
        "add", inp(0), node("mul", const(0.044715), node("pow", inp(0), const(3.0))))))))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", [(1,), (3, 72), (37, 100), (5, 576)])
def test_gelu_new_chain(dtype, shape, device, monkeypatch):
    """GPT-2's decomposed gelu: one kernel for nine ops, one input used three times."""
    torch.manual_seed(sum(shape))
    x = _randn(shape, dtype, device)
    p = _check("pointwise", {"expr": GELU_NEW, "dtype": dtype_name(dtype)}, [x], monkeypatch)
    src = pw.source(p)
    assert src.count("@triton.jit") == 3  # _tanh, _cube and the kernel
    assert "y = ((0.5 * x0) * (1.0 + _tanh(" in src


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_broadcast_layouts(dtype, device, monkeypatch):
    """full [T, H, D], inner [D] and [H, D], outer [T, 1, 1], scalar [] and strided [T, 1, D]."""
    torch.manual_seed(9)
    t, h, d = 37, 3, 20
    xs = [_randn((t, h, d), dtype, device), _positive((d,), dtype, device),
          _randn((h, d), dtype, device), _positive((t, 1, 1), dtype, device),
          _randn((), dtype, device), _randn((t, 1, d), dtype, device)]
    expr = node("add", node("mul", node("silu", inp(0)), inp(1)), node(
        "sub", node("mul", inp(2), node("rsqrt", inp(3))), node("mul", inp(4), inp(5))))
    p = _check("pointwise", {"expr": expr, "dtype": dtype_name(dtype)}, xs, monkeypatch,
               shapes=[("T", h, d), (d,), (h, d), ("T", 1, 1), (), ("T", 1, d)])
    assert p["inputs"] == [{"kind": "full"}, {"kind": "inner", "size": d},
                           {"kind": "inner", "size": h * d}, {"kind": "outer", "size": h * d},
                           {"kind": "scalar"}, {"kind": "strided"}]


def test_attention_mask_chain(device, monkeypatch):
    """A bool padding mask [B, 1, 1, S] turned into an additive bias on scores [B, H, Q, S]."""
    torch.manual_seed(10)
    scores = _randn((2, 3, 5, 7), torch.float32, device)
    mask = torch.rand(2, 1, 1, 7, device=device) > 0.3
    expr = node("add", inp(0), node("mul", node("sub", const(1.0), node(
        "to_dtype", inp(1), dtype="float32")), const(-1e4)))
    p = _check("pointwise", {"expr": expr, "dtype": "float32"}, [scores, mask], monkeypatch)
    assert [i["kind"] for i in p["inputs"]] == ["full", "strided"]


def test_rope_angles_from_positions(device, monkeypatch):
    """cos(position * inv_freq) from int64 positions [T, 1] and a float32 vector [D/2]."""
    positions = torch.arange(37, device=device).reshape(37, 1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, device=device).float() / 64))
    expr = node("cos", node("mul", node("to_dtype", inp(0), dtype="float32"), inp(1)))
    p = _check("pointwise", {"expr": expr, "dtype": "float32"}, [positions, inv_freq], monkeypatch,
               shapes=[("T", 1), (32,)])
    assert [i["kind"] for i in p["inputs"]] == ["outer", "inner"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_name)
def test_explicit_casts_round_inside_the_tree(dtype, device, monkeypatch):
    """HF style: up-cast, compute, round to the model dtype, continue; the inner cast rounds."""
    torch.manual_seed(11)
    x = _randn((3, 100), dtype, device)
    w = _positive((100,), torch.float32, device)
    inner = node("to_dtype", node("mul", node("to_dtype", inp(0), dtype="float32"), inp(1)),
                 dtype=dtype_name(dtype))
    expr = node("mul", inner, const(3.0))
    _check("pointwise", {"expr": expr, "dtype": "float32"}, [x, w], monkeypatch)


@pytest.mark.parametrize("exponent", [2, 3, 0.5, -0.5, -1, -2, 1, 0, 1.5, -3, 4, "tensor", "base"])
def test_pow_variants(exponent, device, monkeypatch):
    torch.manual_seed(12)
    fractional = isinstance(exponent, float) and exponent != int(exponent)
    make = _positive if fractional or exponent == "tensor" else _randn
    x = make((3, 72), torch.float32, device)
    xs = [x]
    if exponent == "tensor":
        xs.append(torch.randint(-2, 4, (3, 72), device=device).float() + 0.5)
        expr = node("pow", inp(0), inp(1))
    elif exponent == "base":
        expr = node("pow", const(2.0), inp(0))
    else:
        expr = node("pow", inp(0), const(exponent))
    _check("pointwise", {"expr": node("add", expr, const(0.25)), "dtype": "float32"}, xs,
           monkeypatch)


@pytest.mark.filterwarnings("ignore:divide by zero")  # log2(0) under the interpreter
def test_pow_signs(device, monkeypatch):
    """Negative bases: odd integer exponents keep the sign, even drop it, fractional give NaN."""
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0, 1.0], device=device)
    b = torch.tensor([3.0, 2.0, 2.0, -1.5, 0.5, float("nan")], device=device)
    expr = node("pow", inp(0), inp(1))
    _, module = _module("pointwise", {"expr": expr, "dtype": "float32"}, [x, b], monkeypatch,
                        out_dtype="float32")
    got = module.launch(x, b, expr=expr, dtype="float32")
    torch.testing.assert_close(got, torch.pow(x, b), equal_nan=True)
    xn = torch.tensor([-2.0, -3.0], device=device)
    bn = torch.tensor([0.5, 0.0], device=device)
    got = module.launch(xn, bn)
    assert math.isnan(got[0].item()) and got[1].item() == 1.0


def test_nan_propagates_through_relu_maximum_minimum(device, monkeypatch):
    x = torch.tensor([float("nan"), -1.0, 2.0, 0.5], device=device)
    y = torch.tensor([1.0, float("nan"), 0.0, 0.25], device=device)
    expr = node("add", node("relu", inp(0)),
                node("add", node("maximum", inp(0), inp(1)), node("minimum", inp(1), inp(0))))
    _, module = _module("pointwise", {"expr": expr, "dtype": "float32"}, [x, y], monkeypatch,
                        out_dtype="float32")
    torch.testing.assert_close(module.launch(x, y), ops.pointwise(x, y, expr=expr,
                                                                  dtype="float32"),
                               equal_nan=True)


def test_non_contiguous_inputs(device, monkeypatch):
    torch.manual_seed(13)
    a = _randn((72, 5), torch.float16, device).t()  # full, transposed
    b = _randn((5, 72), torch.float16, device)[:, ::1]
    c = _randn((72, 2), torch.float16, device)[:, :1].t()  # inner [1, 72], strided in memory
    assert not a.is_contiguous() and not c.is_contiguous()
    expr = node("add", node("mul", inp(0), inp(1)), inp(2))
    _check("pointwise", {"expr": expr, "dtype": "float16"}, [a, b, c], monkeypatch)


def test_empty_output(device):
    expr = node("exp", inp(0))
    p = pw.params("pointwise", {"expr": expr, "dtype": "float32"}, [("T", 8)], ["float32"],
                  "float32")
    module = codegen.load_kernel(pw.source(p))
    assert module.launch(torch.randn(0, 8, device=device)).shape == (0, 8)


def test_launch_checks_attrs_and_inputs(device):
    expr = node("mul", inp(0), inp(1))
    p = pw.params("pointwise", {"expr": expr, "dtype": "float32"}, [("T", 8), (8,)],
                  ["float32", "float32"], "float32")
    module = codegen.load_kernel(pw.source(p))
    x, w = torch.randn(3, 8, device=device), torch.randn(8, device=device)
    assert module.launch(x, w, expr=expr, dtype="float32").shape == (3, 8)
    with pytest.raises(ValueError, match="expr"):
        module.launch(x, w, expr=node("add", inp(0), inp(1)), dtype="float32")
    with pytest.raises(ValueError, match="dtype"):
        module.launch(x, w, expr=expr, dtype="float16")
    with pytest.raises(TypeError, match="inputs"):
        module.launch(x.half(), w)
    with pytest.raises(ValueError, match="input 1"):
        module.launch(torch.randn(3, 1, device=device), torch.randn(1, device=device))


# ---- params() ------------------------------------------------------------------------------
F32 = "float32"


@pytest.mark.parametrize("args", [
    # integer arithmetic is not computed in float32
    ("pointwise", {"expr": node("add", inp(0), inp(1)), "dtype": F32}, [(4,), (4,)],
     ["int64", "int64"], F32),
    ("pointwise", {"expr": node("to_dtype", node("neg", inp(0)), dtype=F32), "dtype": F32},
     [(4,)], ["int32"], F32),
    # float64 anywhere
    ("pointwise", {"expr": node("exp", inp(0)), "dtype": "float64"}, [(4,)], [F32], "float64"),
    ("pointwise", {"expr": node("exp", node("to_dtype", inp(0), dtype="float64")),
                   "dtype": F32}, [(4,)], [F32], F32),
    ("pointwise", {"expr": node("exp", inp(0)), "dtype": F32}, [(4,)], ["float64"], F32),
    # casts to integers inside the tree, integer outputs
    ("pointwise", {"expr": node("mul", node("to_dtype", inp(0), dtype="int64"), const(2.0)),
                   "dtype": F32}, [(4,)], [F32], F32),
    ("pointwise", {"expr": node("exp", inp(0)), "dtype": "int64"}, [(4,)], [F32], "int64"),
    ("to_dtype", {"dtype": "int64"}, [(4,)], [F32], "int64"),
    # unknown ops, bad structure
    ("pointwise", {"expr": node("softmax", inp(0), dim=-1), "dtype": F32}, [(4,)], [F32], F32),
    ("pointwise", {"expr": node("exp", inp(0), inp(0)), "dtype": F32}, [(4,)], [F32], F32),
    ("pointwise", {"expr": node("exp", const(1.0)), "dtype": F32}, [(4,)], [F32], F32),
    ("pointwise", {"expr": node("add", inp(0), const("a")), "dtype": F32}, [(4,)], [F32], F32),
    ("pointwise", {"expr": node("add", inp(0), inp(2)), "dtype": F32}, [(4,), (4,)], [F32] * 2,
     F32),
    ("pointwise", {"expr": node("exp", inp(0)), "dtype": F32}, [(4,), (4,)], [F32] * 2, F32),
    ("pointwise", {"expr": node("add", inp(0), inp(0), alpha=2), "dtype": F32}, [(4,)], [F32],
     F32),
    ("pointwise", {"expr": node("gelu", inp(0), approximate="erf"), "dtype": F32}, [(4,)], [F32],
     F32),
    # attributes
    ("pointwise", {"expr": node("exp", inp(0)), "dtype": "float16"}, [(4,)], [F32], F32),
    ("pointwise", {"expr": node("exp", inp(0))}, [(4,)], [F32], F32),
    ("add", {"scalar": 1.0}, [(4,), (4,)], [F32] * 2, F32),
    ("exp", {"scalar_first": True}, [(4,)], [F32], F32),
    ("add", {}, [(4,), (4,)], ["float16", "float16"], F32),  # a lone op's dtype is torch's
    # shapes that do not broadcast
    ("pointwise", {"expr": node("add", inp(0), inp(1)), "dtype": F32}, [(3,), (4,)], [F32] * 2,
     F32),
    ("pointwise", {"expr": node("add", inp(0), inp(1)), "dtype": F32}, [("T", 4), ("S", 4)],
     [F32] * 2, F32),
    # not elementwise at all
    ("rms_norm", {"eps": 1e-6}, [(3, 4), (4,)], [F32] * 2, F32),
    ("pointwise", {"expr": node("exp", inp(0)), "dtype": F32}, [], [], F32),
])
def test_params_rejects(args):
    assert pw.params(*args) is None


def test_params_and_render_are_deterministic():
    expr = node("mul", node("silu", inp(0)), inp(1))
    args = ("pointwise", {"expr": expr, "dtype": "bfloat16"}, [("T", 896), (896,)],
            ["bfloat16", "bfloat16"], "bfloat16")
    p = pw.params(*args)
    assert p == {"op": "pointwise", "attrs": {"expr": expr, "dtype": "bfloat16"},
                 "dtype": "bfloat16", "in_dtypes": ["bfloat16", "bfloat16"],
                 "inputs": [{"kind": "full"}, {"kind": "inner", "size": 896}], "rank": 2,
                 "BLOCK": 1024, "num_warps": 4}
    src = pw.source(p, nodes=["a", "b"])
    assert src == pw.source(pw.params(*args), nodes=["a", "b"])
    # the engine stores params as JSON (keys sorted); the runtime re-renders from that copy
    assert src == pw.source(json.loads(json.dumps(p, sort_keys=True)), nodes=["a", "b"])
    assert "y = (_silu(x0) * x1)" in src
    assert "_tanh" not in src and "_pow" not in src  # helpers only where the tree uses them
    lone = pw.params("add", {"scalar": 1e-6}, [("T", 1)], [F32], F32)
    assert lone["expr"] == node("add", inp(0), const(1e-6))


def test_constants_render_as_float32_literals(device, monkeypatch):
    x = torch.tensor([1.0, 0.5, 3.0], device=device)
    expr = node("add", node("mul", inp(0), const(2)),  # int constant
                node("exp", node("mul", inp(0), const(float("-inf")))))  # exp(-inf) = 0
    p = _check("pointwise", {"expr": expr, "dtype": "float32"}, [x], monkeypatch)
    src = pw.source(p)
    assert '(x0 * -float("inf"))' in src and "(x0 * 2.0)" in src


# ---- larger sweep --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(ops.UNARY))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", [(1,), (3, 72), (37, 576), (2, 3, 1000)])
def test_unary_sweep(op, dtype, shape, device, monkeypatch):
    torch.manual_seed(sum(shape))
    make = _positive if op in POSITIVE_DOMAIN else _randn
    _check(op, {}, [2 * make(shape, dtype, device)], monkeypatch)  # exp stays in float16 range


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(ops.BINARY))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shapes", [[(37, 100), (37, 100)], [(37, 100), (100,)],
                                    [(37, 100), (37, 1)], [(1,), (3, 576)],
                                    [(4, 1, 72), (1, 3, 72)], [(2, 3, 5), ()]])
def test_binary_sweep(op, dtype, shapes, device, monkeypatch):
    torch.manual_seed(len(op))
    make = _positive if op in ("div", "pow") else _randn
    _check(op, {}, [make(s, dtype, device) for s in shapes], monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("shape", [(1, 72), (3, 100), (37, 576), (130, 1000)])
def test_chain_sweep(dtype, shape, device, monkeypatch):
    torch.manual_seed(sum(shape))
    d = shape[-1]
    xs = [_randn(shape, dtype, device), _positive((d,), dtype, device),
          _positive((shape[0], 1), torch.float32, device)]
    expr = node("to_dtype", node("mul", node("gelu", node("add", inp(0), const(0.1)),
                                             approximate="tanh"),
                                 node("div", inp(1), node("sqrt", inp(2)))), dtype=dtype_name(dtype))
    _check("pointwise", {"expr": expr, "dtype": dtype_name(dtype)}, xs, monkeypatch)
    _check("pointwise", {"expr": GELU_NEW, "dtype": dtype_name(dtype)}, xs[:1], monkeypatch)
