"""The verifier accepts a well-formed graph and rejects each kind of malformed one with an
error that names the problem (it runs after every pass, so its message is what a user sees
when a pass goes wrong)."""

from __future__ import annotations

import pytest

from llm_engine.builder.ir import Graph, WeightSpec
from llm_engine.builder.verify import VerifyError, verify
from tests.graphs import add_input, add_op, add_weight


def _mlp() -> Graph:
    """x [1, T, 8] -> linear -> silu -> add residual -> rms_norm: a bit of every op family."""
    g = Graph()
    x = add_input(g, "x", (1, "T", 8))
    w = add_weight(g, "proj.weight", (8, 8))
    norm_w = add_weight(g, "norm.weight", (8,))
    h = add_op(g, "silu", [add_op(g, "linear", [x, w])])
    s = add_op(g, "add", [h, x])
    g.outputs = [add_op(g, "rms_norm", [s, norm_w], {"eps": 1e-6}, name="out")]
    return g


def test_accepts_well_formed_graph() -> None:
    verify(_mlp())


def test_accepts_symbolic_attrs() -> None:
    # reshape to a T-dependent shape is legal when the attribute is symbolic
    g = Graph()
    x = add_input(g, "x", (1, "T", 8))
    g.outputs = [add_op(g, "reshape", [x], {"shape": [{"sym": "2*T"}, 4]})]
    assert g.node(g.outputs[0]).shape == ("2*T", 4)
    verify(g)


def test_rejects_unknown_op() -> None:
    g = _mlp()
    g.node("out").op = "fancy_norm"
    with pytest.raises(VerifyError, match=r"out: op 'fancy_norm' is not in the IR op set"):
        verify(g)


def test_rejects_input_list_naming_missing_node() -> None:
    # the node's input list names a value nothing produces (edges untouched)
    g = _mlp()
    g.node("out").inputs[0] = "nowhere"
    with pytest.raises(VerifyError, match=r"out: input 'nowhere' does not exist"):
        verify(g)


def test_rejects_dangling_edge_from_set_inputs() -> None:
    # set_inputs with a missing name makes networkx create a bare node; the verifier must
    # report it as a missing input rather than crash on the bare node
    g = _mlp()
    g.set_inputs(g.node("out"), ["typo", "norm_weight"])
    with pytest.raises(VerifyError, match=r"out: input 'typo' does not exist"):
        verify(g)


def test_rejects_edges_that_disagree_with_inputs() -> None:
    g = _mlp()
    g.g.add_edge("x", "out")  # an edge the node's input list does not mention
    with pytest.raises(VerifyError, match=r"out: edges disagree with its input list"):
        verify(g)


def test_rejects_cycle() -> None:
    g = Graph()
    x = add_input(g, "x", (4,))
    a = add_op(g, "neg", [x], name="a")
    b = add_op(g, "exp", [a], name="b")
    g.set_inputs(g.node(a), [b])  # a <- b <- a
    g.outputs = [b]
    with pytest.raises(VerifyError, match=r"graph has a cycle"):
        verify(g)


def test_rejects_wrong_arity() -> None:
    g = _mlp()
    g.set_inputs(g.node("out"), ["add", "norm_weight", "x"])  # rms_norm takes 2
    with pytest.raises(VerifyError, match=r"out \(rms_norm\): 3 inputs, expected 2\.\.2"):
        verify(g)


def test_rejects_output_not_in_graph() -> None:
    g = _mlp()
    g.outputs.append("logits")
    with pytest.raises(VerifyError, match=r"graph input/output 'logits' does not exist"):
        verify(g)


def test_rejects_input_not_in_graph() -> None:
    g = _mlp()
    g.inputs.append("position_ids")
    with pytest.raises(VerifyError, match=r"'position_ids' does not exist"):
        verify(g)


def test_rejects_weight_without_spec() -> None:
    g = _mlp()
    del g.weights["proj.weight"]
    with pytest.raises(VerifyError, match=r"proj_weight: weight 'proj.weight' is not declared"):
        verify(g)


def test_rejects_weight_node_disagreeing_with_spec() -> None:
    g = _mlp()
    spec = g.weights["norm.weight"]
    g.weights["norm.weight"] = WeightSpec(spec.name, (9,), spec.dtype, spec.recipe)
    with pytest.raises(VerifyError, match=r"norm_weight: weight node .* declared \(9,\)"):
        verify(g)


def test_rejects_wrong_shape() -> None:
    g = _mlp()
    g.node("out").shape = (1, "T", 4)
    with pytest.raises(VerifyError, match=r"out \(rms_norm\): reference gives \(1, 3, 8\)"):
        verify(g)


def test_rejects_wrong_dtype() -> None:
    g = _mlp()
    g.node("out").dtype = "float16"
    with pytest.raises(VerifyError, match=r"out \(rms_norm\): .*graph records .* float16"):
        verify(g)


def test_rejects_shape_frozen_to_one_token_count() -> None:
    # a T dimension recorded as the constant 3 matches the first probe (T=3) only: the
    # second probe is what catches it
    g = _mlp()
    g.node("out").shape = (1, 3, 8)
    with pytest.raises(VerifyError, match=r"out \(rms_norm\): .* at \{'T': 5"):
        verify(g)
    verify(g, semantic=False)  # structurally the graph is fine


def test_rejects_op_that_fails_on_meta_tensors() -> None:
    # linear with a weight of the wrong inner size cannot run at all
    g = _mlp()
    w = add_weight(g, "bad.weight", (8, 5))
    g.set_inputs(g.node("linear"), ["x", w])
    with pytest.raises(VerifyError, match=r"linear \(linear\) fails on meta tensors"):
        verify(g)


def test_rejects_wrong_output_count() -> None:
    # a multi-output op recorded with one shape
    g = Graph()
    x = add_input(g, "x", (1, "T", 8))
    r = add_input(g, "r", (1, "T", 8))
    w = add_weight(g, "norm.weight", (8,))
    fused = add_op(g, "add_rms_norm", [x, r, w], {"eps": 1e-6}, name="fused")
    g.outputs = [add_op(g, "getitem", [fused], {"index": 0})]
    verify(g)
    g.node(fused).shape, g.node(fused).dtype = (1, "T", 8), "float32"
    with pytest.raises(VerifyError, match=r"fused \(add_rms_norm\): 2 outputs, 1 recorded"):
        verify(g)
