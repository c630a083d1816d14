"""templates/moe.py.j2: the grouped-GEMM experts block against kernels.ops.moe (the torch
reference), under the Triton interpreter on a CPU host.

Tolerance: rel_error (max |got - want| / max |want|) <= 1e-4 in float32 (IEEE dots: only the
summation order differs), 2e-2 in bfloat16 and 2e-3 in float16 (measured: at most 4e-7, 9e-3
and 5e-4). In 16-bit the kernel rounds where the reference's torch ops round (the gate_up
output, act(gate), the expert output), but accumulates in float32 and sums a token's k expert
outputs in float32 before one rounding, where the reference adds them in the activation
dtype. Buffers the kernel allocates start as NaN, so a row it fails to write (or padding it
reads) fails the test. Routing leaves some experts without tokens in every case.
"""

from __future__ import annotations

import json

import pytest
import torch

from llm_engine.kernels import codegen, ops
from llm_engine.kernels.dtypes import dtype_name
from llm_engine.kernels.triton import moe
from tests.triton.conftest import interpreter_bf16  # noqa: F401  (round bf16 as the GPU does)
from tests.triton.util import PoisonedTorch, rel_error

RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
CLAMPED = {"act": "clamped_swiglu", "alpha": 1.702, "limit": 1.5}


def _inputs(tokens: int, experts: int, k: int, hidden: int, inter: int, dtype: torch.dtype,
            bias: bool, seed: int) -> list[torch.Tensor]:
    """x, index, weights, gate_up, down[, biases]; experts 1 and E - 1 are never chosen."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, [1, experts - 1]] = float("-inf")
    top = torch.topk(logits.softmax(-1), k)
    weights = top.values / top.values.sum(-1, keepdim=True)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    out = [x.to(dtype), top.indices, weights, gate_up.to(dtype), down.to(dtype)]
    if bias:
        out += [(0.1 * torch.randn(experts, 2 * inter, generator=g)).to(dtype),
                (0.1 * torch.randn(experts, hidden, generator=g)).to(dtype)]
    return out


def _params(attrs: dict, inputs: list[torch.Tensor], shapes: list[tuple] | None = None):
    shapes = shapes or [tuple(t.shape) for t in inputs]
    dtypes = [dtype_name(t.dtype) for t in inputs]
    return moe.params("moe", attrs, shapes, dtypes, dtypes[0])


def _check(attrs: dict, inputs: list[torch.Tensor], monkeypatch, shapes=None) -> dict:
    p = _params(attrs, inputs, shapes)
    assert p is not None
    module = codegen.load_kernel(moe.source(p, nodes=["layers.0.moe"]))
    monkeypatch.setattr(module, "torch", PoisonedTorch())
    got = module.launch(*inputs, **attrs)
    want = ops.moe(*inputs, **attrs)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = rel_error(got, want)
    tol = RTOL[inputs[0].dtype]
    assert err <= tol, f"{attrs['act']} {inputs[0].dtype}: rel_error {err:.3g} > {tol}"
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("attrs", [{"act": "silu"}, CLAMPED], ids=["silu", "clamped"])
@pytest.mark.parametrize("tokens,experts,k,hidden,inter", [
    (1, 4, 1, 40, 24),  # decode; H, I not multiples of the blocks
    (7, 4, 2, 72, 40),
    (33, 8, 2, 100, 56),  # more rows than BLOCK_M in all: several blocks per expert
])
def test_moe_matches_reference(tokens, experts, k, hidden, inter, attrs, bias, dtype,
                               monkeypatch):
    inputs = _inputs(tokens, experts, k, hidden, inter, dtype, bias, seed=tokens * 10 + k)
    _check(attrs, inputs, monkeypatch)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
def test_other_gate_activations(act, monkeypatch):
    _check({"act": act}, _inputs(7, 4, 2, 40, 24, torch.float32, True, seed=5), monkeypatch)


def test_float16_and_symbolic_tokens(monkeypatch):
    inputs = _inputs(9, 8, 2, 48, 32, torch.float16, False, seed=6)
    shapes = [("T", 48), ("T", 2), ("T", 2), (8, 64, 48), (8, 48, 32)]
    p = _check({"act": "silu"}, inputs, monkeypatch, shapes=shapes)
    assert p == _params({"act": "silu"}, inputs)  # the kernel does not depend on T


def test_experts_in_another_float_dtype(monkeypatch):
    """float32 experts under bfloat16 activations: cast to bf16 as the reference casts them."""
    inputs = _inputs(7, 4, 2, 40, 24, torch.float32, True, seed=11)
    inputs[0] = inputs[0].to(torch.bfloat16)
    _check({"act": "silu"}, inputs, monkeypatch)


def test_leading_dims_and_non_contiguous(monkeypatch):
    x, index, weights, gate_up, down = _inputs(6, 4, 2, 40, 24, torch.float32, False, seed=7)
    x = x.t().contiguous().t().reshape(2, 3, 40)  # [2, 3, H], rows not contiguous
    gate_up = gate_up.transpose(1, 2).contiguous().transpose(1, 2)  # H-major storage
    inputs = [x, index.reshape(2, 3, 2), weights.reshape(2, 3, 2), gate_up, down]
    _check({"act": "silu"}, inputs, monkeypatch)


def test_routing_pads_each_expert_to_whole_blocks():
    p = _params({"act": "silu"}, _inputs(1, 8, 2, 32, 32, torch.float32, False, seed=8))
    module = codegen.load_kernel(moe.source(p))
    index = torch.tensor([[5, 0], [5, 3], [0, 5], [5, 6], [7, 5]])
    bm = 16
    sorted_ids, block_expert = module.route(index, bm)
    pairs = index.numel()
    assert len(sorted_ids) == len(block_expert) * bm
    real = sorted_ids[sorted_ids < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # every pair once
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * bm:(b + 1) * bm]
        ids = rows[rows < pairs]
        if e < 0:
            assert len(ids) == 0
        else:
            assert len(ids) and (index.reshape(-1)[ids] == e).all()
    assert block_expert.tolist()[:5] == [0, 3, 5, 6, 7]  # sorted, empty experts skipped


def test_row_block_shrinks_for_decode():
    p = _params({"act": "silu"}, _inputs(1, 8, 2, 32, 32, torch.float32, False, seed=9))
    module = codegen.load_kernel(moe.source(p))
    assert module.block_m(2) == 16
    assert module.block_m(8 * 20) == 32
    assert module.block_m(8 * 4096) == p["BLOCK_M"]


def test_empty_and_launch_checks():
    inputs = _inputs(3, 4, 2, 40, 24, torch.float32, False, seed=10)
    module = codegen.load_kernel(moe.source(_params({"act": "silu"}, inputs)))
    x, index, weights, *experts = inputs
    assert module.launch(x[:0], index[:0], weights[:0], *experts, act="silu").shape == (0, 40)
    with pytest.raises(ValueError, match="act"):
        module.launch(*inputs, act="gelu")
    with pytest.raises(ValueError, match="biases"):
        module.launch(*inputs, torch.zeros(4, 48), torch.zeros(4, 40), act="silu")
    with pytest.raises(ValueError, match="dense"):
        module.launch(*inputs, act="silu", w_format="int8_channel")
    assert module.launch(*inputs, act="silu", w_format="dense").shape == (3, 40)
    with pytest.raises(ValueError, match="rendered for"):
        module.launch(x[:, :32], index, weights, *experts, act="silu")


SHAPES = [(5, 16), (5, 2), (5, 2), (4, 48, 16), (4, 16, 24)]
F32 = ["float32", "int64", "float32", "float32", "float32"]


@pytest.mark.parametrize("attrs,shapes,dtypes,out", [
    ({"act": "tanh"}, SHAPES, F32, "float32"),  # not a gate activation
    ({"act": "silu", "alpha": 1.0}, SHAPES, F32, "float32"),
    ({"act": "clamped_swiglu", "alpha": 1.7}, SHAPES, F32, "float32"),  # no limit
    ({"act": "clamped_swiglu", "alpha": 1.7, "limit": float("inf")}, SHAPES, F32, "float32"),
    ({"act": "clamped_swiglu", "alpha": True, "limit": 7.0}, SHAPES, F32, "float32"),
    ({"act": "silu"}, SHAPES, [*F32[:3], "uint8", "float32"], "float32"),  # quantized experts
    ({"act": "silu"}, SHAPES, [*F32[:4], "int8"], "float32"),
    ({"act": "silu"}, SHAPES, ["float64", *F32[1:]], "float64"),
    ({"act": "silu"}, SHAPES, F32, "bfloat16"),  # output dtype differs
    ({"act": "silu"}, SHAPES, [F32[0], "float32", *F32[2:]], "float32"),  # float index
    ({"act": "silu"}, [*SHAPES[:3], ("E", 48, 16), SHAPES[4]], F32, "float32"),
    ({"act": "silu"}, [("T", "K"), ("T", 2), ("T", 2), *SHAPES[3:]], F32, "float32"),
    ({"act": "silu"}, [*SHAPES[:3], (4, 47, 16), SHAPES[4]], F32, "float32"),  # odd 2I
    ({"act": "silu"}, [*SHAPES[:4], (4, 16, 23)], F32, "float32"),  # down's I differs
    ({"act": "silu"}, [SHAPES[0], (5, 2), (5, 3), *SHAPES[3:]], F32, "float32"),
    # a bias of the wrong shape
    ({"act": "silu"}, [*SHAPES, (4, 48), (4, 15)], [*F32, "float32", "float32"], "float32"),
    ({"act": "silu"}, [*SHAPES, (4, 48)], [*F32, "float32"], "float32"),  # one bias only
    ({"act": "silu", "w_format": "int8_channel"}, SHAPES, F32, "float32"),
    ({"act": "silu"}, SHAPES[:4], F32[:4], "float32"),  # no down
])
def test_params_declines(attrs, shapes, dtypes, out):
    assert moe.params("moe", attrs, shapes, dtypes, out) is None


def test_params_are_renderable_and_stable():
    p = moe.params("moe", CLAMPED, [*SHAPES, (4, 48), (4, 16)], [*F32, "bfloat16", "bfloat16"],
                   "float32")
    assert p is not None and p["clamped"] and p["act"] == "silu"
    assert p["bias"]
    assert p == moe.params("moe", {**CLAMPED, "w_format": "dense"}, [*SHAPES, (4, 48), (4, 16)],
                           [*F32, "bfloat16", "bfloat16"], "float32")
    assert not any(isinstance(v, float) for v in p.values())  # alpha, limit: launch args
    codegen.check_params(p)
    again = json.loads(json.dumps(p, sort_keys=True))  # as the engine stores params
    assert moe.source(p, nodes=["a"]) == moe.source(again, nodes=["a"])
    src = moe.source(p)
    assert 'ACT = "clamped_swiglu"' in src and "1.702" not in src


MOE_ARCHS = ["mixtral", pytest.param("gpt_oss", marks=pytest.mark.slow),
             pytest.param("qwen2_moe", marks=pytest.mark.slow)]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_engine_runs_moe_on_the_family(arch, engines):
    """A tiny MoE model's `moe` nodes get the moe kernel at build time (no reference
    fallback) and the runtime's check re-derives and accepts them. gpt-oss: biased experts
    and the clamped SwiGLU; Qwen2-MoE: a shared expert beside the routed ones."""
    from llm_engine.builder.inspect_kernels import kernel_table
    from llm_engine.runtime import Engine

    path = engines(arch)
    plan = json.loads((path / "plan.rank0.json").read_text())
    nodes = [n for n in plan["nodes"] if n["op"] == "moe"]
    assert len(nodes) == 2 and all(n.get("kernel") for n in nodes)
    assert {plan["kernels"][k]["family"] for n in nodes for k in n["kernel"]} == {"moe"}
    table = kernel_table(path)
    assert "moe" not in table["reference_fallback"]
    assert any(row["template"] == "moe" and len(row["nodes"]) == 2 for row in table["kernels"])
    engine = Engine.load(path, kernels="triton", block_size=4, kv_cache_memory=1 << 20)
    assert engine.kernel_backend == "triton"


def test_tampered_moe_parameters_are_refused(engines, tmp_path):
    """Each moe kernel parameter, changed in a forged engine (kernel re-rendered, checksums
    re-signed), is refused at load: the runtime derives them from the plan node."""
    from llm_engine.runtime import Engine, EngineLoadError
    from tests.security.test_malicious_engine import _forge, _plausible

    engine = engines("mixtral")
    plan = json.loads((engine / "plan.rank0.json").read_text())
    params = next(i["params"] for i in plan["kernels"].values() if i["template"] == "moe")
    for i, (key, value) in enumerate(sorted(params.items())):
        path, new = tmp_path / key, _plausible(key, value)

        def tamper(plan, info, key=key, new=new):
            info["params"][key] = new
        _forge(engine, path, tamper, "moe")
        with pytest.raises(EngineLoadError, match=f"parameters are not what .*{key}"):
            Engine.load(path, kernels=("reference", "triton")[i % 2], kv_cache_memory=1 << 20)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_engine_generates_as_the_reference(arch, engines, monkeypatch):
    """The whole tiny MoE model under --kernels triton (interpreted, a few seconds) gives the
    reference's tokens and logprobs, and its moe nodes ran on the kernel."""
    import sys

    from llm_engine.runtime import Engine, SamplingParams

    path = engines(arch)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5]]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=2)
    opts = dict(block_size=4, kv_cache_memory=1 << 20)
    ref = Engine.load(path, kernels="reference", **opts).generate(prompts, params)
    engine = Engine.load(path, kernels="triton", **opts)
    plan = json.loads((path / "plan.rank0.json").read_text())
    (name,) = {k for n in plan["nodes"] if n["op"] == "moe" for k in n["kernel"]}
    module, calls = sys.modules[name], []  # the bound launch looks `route` up at call time
    route = module.route
    monkeypatch.setattr(module, "route", lambda *a: calls.append(1) or route(*a))
    got = engine.generate(prompts, params)
    assert len(calls) >= 2 * 4  # two layers, a prefill and three decode steps at least
    for r, g in zip(ref, got):
        assert g.token_ids == r.token_ids
        for rl, gl in zip(r.logprobs, g.logprobs):
            assert rl.keys() == gl.keys()
            for key in rl:
                assert gl[key] == pytest.approx(rl[key], abs=1e-4)
