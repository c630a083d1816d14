"""plan_memory: activation buffers shared by liveness. Hand-checked small cases, then a
property test over random chain/diamond graphs against an independent liveness computation:
no two values alive at the same step share a buffer, every buffer fits what it holds, and
reuse never costs more than one buffer per value."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_engine.builder.ir import Graph
from llm_engine.builder.passes.plan_memory import plan_memory
from llm_engine.kernels.dtypes import itemsize
from llm_engine.kernels.ops import VIEW_OPS
from llm_engine.kernels.symbolic import eval_shape
from tests.graphs import add_input, add_op, add_weight

X = (1, "T", 8)


def _options(tokens: int) -> SimpleNamespace:
    return SimpleNamespace(max_batch_tokens=tokens)


def chain(n: int) -> Graph:
    """x -> op1 -> op2 -> ... -> opn: each value dies when the next one is made."""
    g = Graph()
    value = add_input(g, "x", X)
    for i in range(n):
        value = add_op(g, ("exp", "neg", "tanh", "sin")[i % 4], [value], name=f"v{i}")
    g.outputs = [value]
    return g


def test_chain_uses_two_buffers() -> None:
    # v_i is read by v_{i+1}, so neighbours overlap; v_i and v_{i+2} never do
    g = chain(4)
    _, report = plan_memory(g, _options(16))
    mem = g.meta["memory"]
    value_bytes = 16 * 8 * 4
    assert mem["assignment"] == {"v0": 0, "v1": 1, "v2": 0, "v3": 1}
    assert mem["buffers"] == [value_bytes, value_bytes]
    assert mem["no_reuse_bytes"] == 4 * value_bytes
    assert mem["planned_bytes"] == mem["peak_live_bytes"] == 2 * value_bytes
    assert mem["max_batch_tokens"] == 16
    assert report.stats == {"max_batch_tokens": 16, "values": 4, "buffers": 2,
                            "activation_bytes_no_reuse": 4 * value_bytes,
                            "activation_bytes_planned": 2 * value_bytes,
                            "peak_live_bytes": 2 * value_bytes}
    assert report.changed
    assert report.notes == ["activations at T=16: 0.0 MiB without reuse, 0.0 MiB in 2 shared "
                            "buffers"]


def test_default_token_count_and_report_in_mib() -> None:
    # without options the plan is sized for 512 tokens
    g = Graph()
    x = add_input(g, "x", (1, "T", 1024))
    g.outputs = [add_op(g, "neg", [add_op(g, "exp", [x])])]
    _, report = plan_memory(g)
    assert g.meta["memory"]["max_batch_tokens"] == 512
    assert report.stats["activation_bytes_no_reuse"] == 2 * 512 * 1024 * 4  # 4 MiB
    assert report.notes == ["activations at T=512: 4.0 MiB without reuse, 4.0 MiB in 2 shared "
                            "buffers"]


def test_views_get_no_buffer_and_keep_their_base_alive() -> None:
    # a is read late through two reshapes, so a, b and c are all alive at d
    g = Graph()
    x = add_input(g, "x", X)
    a = add_op(g, "exp", [x], name="a")
    flat = add_op(g, "reshape", [a], {"shape": [1, {"sym": "8*T"}]}, name="flat")
    b = add_op(g, "neg", [x], name="b")
    c = add_op(g, "tanh", [b], name="c")
    back = add_op(g, "reshape", [flat], {"shape": [1, {"sym": "T"}, 8]}, name="back")
    g.outputs = [add_op(g, "mul", [back, c], name="d")]
    plan_memory(g, _options(4))
    assignment = g.meta["memory"]["assignment"]
    assert set(assignment) == {"a", "b", "c", "d"}
    assert assignment["a"] not in (assignment["b"], assignment["c"], assignment["d"])
    assert assignment["b"] != assignment["c"]  # b is read by c


def test_outputs_live_to_the_end() -> None:
    # a is an output: the buffer of a dead intermediate may be reused, a's may not
    g = Graph()
    x = add_input(g, "x", X)
    a = add_op(g, "exp", [x], name="a")
    b = add_op(g, "neg", [a], name="b")
    c = add_op(g, "tanh", [b], name="c")
    g.outputs = [a, add_op(g, "sin", [c], name="d")]
    plan_memory(g, _options(4))
    assignment = g.meta["memory"]["assignment"]
    assert assignment["a"] not in (assignment["b"], assignment["c"], assignment["d"])
    assert assignment["d"] == assignment["b"]  # b died when c was made


def test_sizes_follow_dtype_and_multi_output() -> None:
    # inputs and weights are not activations; a two-output op's buffer holds both outputs
    g = Graph()
    x = add_input(g, "x", X, "bfloat16")
    r = add_input(g, "r", X, "bfloat16")
    w = add_weight(g, "norm.weight", (8,), "bfloat16")
    fused = add_op(g, "add_rms_norm", [x, r, w], {"eps": 1e-6}, name="fused")
    g.outputs = [add_op(g, "getitem", [fused], {"index": 0}, name="out")]
    plan_memory(g, _options(10))
    mem = g.meta["memory"]
    assert mem["assignment"] == {"fused": 0}  # getitem is a view of it
    assert mem["buffers"] == [2 * 10 * 8 * 2]


# ---- property test --------------------------------------------------------------------------
UNARY = ("exp", "neg", "tanh", "sin")


@st.composite
def random_graphs(draw: st.DrawFn) -> Graph:
    """Random DAGs of [1, T, W] values: unary ops (chains), adds of two earlier values
    (diamonds), cat (wider), slice and reshape (views), sum (small), casts (other itemsize),
    with a random set of outputs."""
    g = Graph()
    values = [add_input(g, "x", X)]
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(("unary", "add", "cat", "slice", "reshape", "sum", "cast")))
        a = values[draw(st.integers(0, len(values) - 1))]
        b = values[draw(st.integers(0, len(values) - 1))]
        width = g.node(a).shape[-1]
        if kind == "add" and g.node(b).shape == g.node(a).shape:
            value = add_op(g, "add", [a, b])
        elif kind == "cat" and width + g.node(b).shape[-1] <= 32:
            value = add_op(g, "cat", [a, b], {"dim": -1})
        elif kind == "slice" and width > 1:
            value = add_op(g, "slice", [a], {"dim": 2, "start": 0, "end": width // 2, "step": 1})
        elif kind == "reshape":
            value = add_op(g, "reshape", [a], {"shape": [1, {"sym": "T"}, width]})
        elif kind == "sum":
            value = add_op(g, "sum", [a], {"dims": [-1], "keepdim": True})
        elif kind == "cast":
            value = add_op(g, "to_dtype", [a], {"dtype": draw(st.sampled_from(
                ("float16", "float32")))})
        else:
            value = add_op(g, draw(st.sampled_from(UNARY)), [a])
        values.append(value)
    extra = draw(st.lists(st.sampled_from(values[1:]), max_size=3, unique=True))
    g.outputs = list(dict.fromkeys([values[-1], *extra]))
    return g


def _live_intervals(g: Graph) -> dict[str, tuple[int, int]]:
    """Independent liveness: [step made, last step read] of every buffer-owning value, where
    reading a view reads its base and an output is read after the last step."""
    order = g.nodes()
    index = {n.name: i for i, n in enumerate(order)}

    def base(name: str) -> str:
        node = g.node(name)
        return base(node.inputs[0]) if node.op in VIEW_OPS else name

    owners = {n.name for n in order if n.op not in ("input", "weight", *VIEW_OPS)}
    last = {o: index[o] for o in owners}
    for n in order:
        for i in n.inputs:
            if base(i) in owners:
                last[base(i)] = max(last[base(i)], index[n.name])
    for out in g.outputs:
        if base(out) in owners:
            last[base(out)] = len(order)
    return {o: (index[o], last[o]) for o in owners}


def _bytes(g: Graph, name: str, env: dict[str, int]) -> int:
    node = g.node(name)
    size = 1
    for s in eval_shape(node.shape, env):
        size *= s
    return size * itemsize(node.dtype)


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(graph=random_graphs(), tokens=st.sampled_from((1, 7, 64)))
def test_plan_never_overlaps_live_values(graph: Graph, tokens: int) -> None:
    _, report = plan_memory(graph, _options(tokens))
    mem = graph.meta["memory"]
    assignment, buffers = mem["assignment"], mem["buffers"]
    live = _live_intervals(graph)
    env = {"T": tokens, "N": tokens}

    assert set(assignment) == set(live)  # every owner planned; no view, input or weight
    for name, slot in assignment.items():
        assert buffers[slot] >= _bytes(graph, name, env)
    names = sorted(live)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (s1, e1), (s2, e2) = live[a], live[b]
            if s1 <= e2 and s2 <= e1:  # alive at a common step (ends inclusive)
                assert assignment[a] != assignment[b], (a, b, live[a], live[b])

    assert mem["no_reuse_bytes"] == sum(_bytes(graph, n, env) for n in live)
    assert mem["peak_live_bytes"] <= mem["planned_bytes"] <= mem["no_reuse_bytes"]
    assert mem["planned_bytes"] == sum(buffers)
    assert report.stats["values"] == len(live) and report.stats["buffers"] == len(buffers)
