"""The kv_cache and select_logits passes on small attention graphs: causal `sdpa` becomes
`paged_attention` over the KV heads (HF's repeat_kv stripped), the attention metadata become
graph inputs, and the logits head computes only the selected rows."""

from __future__ import annotations

import pytest
import torch

from llm_engine.builder.ir import Graph
from llm_engine.builder.passes.kv_cache import METADATA_INPUTS, kv_cache, select_logits
from llm_engine.builder.verify import verify
from tests.graphs import (
    add_input,
    add_op,
    add_weight,
    copy_graph,
    kv_context,
    one_sequence_metadata,
    random_feeds,
    random_weights,
    run,
)

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
SCALE = HEAD_DIM ** -0.5


def repeat_kv(g: Graph, x: str, groups: int) -> str:
    """HF's repeat_kv: [1, Hkv, T, D] -> unsqueeze(2) -> expand -> reshape [1, Hkv*g, T, D]."""
    u = add_op(g, "unsqueeze", [x], {"dim": 2})
    e = add_op(g, "expand", [u], {"shape": [1, KV_HEADS, groups, {"sym": "T"}, HEAD_DIM]})
    return add_op(g, "reshape", [e], {"shape": [1, KV_HEADS * groups, {"sym": "T"}, HEAD_DIM]})


def attention_graph(layers: int = 1, *, gqa: bool = True, window: int | None = None) -> Graph:
    """`layers` causal attentions in a row; each layer's output is the next one's query."""
    g = Graph()
    q = add_input(g, "q", (1, HEADS, "T", HEAD_DIM))
    kv_heads = KV_HEADS if gqa else HEADS
    for layer in range(layers):
        k = add_input(g, f"k{layer}", (1, kv_heads, "T", HEAD_DIM))
        v = add_input(g, f"v{layer}", (1, kv_heads, "T", HEAD_DIM))
        if gqa:
            k, v = repeat_kv(g, k, HEADS // KV_HEADS), repeat_kv(g, v, HEADS // KV_HEADS)
        q = add_op(g, "sdpa", [q, k, v], {"scale": SCALE, "window": window}, name=f"attn{layer}")
    g.outputs = [q]
    return g


def test_sdpa_becomes_paged_attention_over_kv_heads() -> None:
    g = attention_graph()
    origin = g.node("attn0").origin
    _, report = kv_cache(g)
    verify(g)
    ops = g.op_counts()
    assert "sdpa" not in ops and ops["paged_attention"] == 1
    # repeat_kv is gone: the cache holds KV heads and the kernel shares them across groups
    assert not {"unsqueeze", "expand", "reshape"} & set(ops)
    node = g.node("paged_attention_0")
    assert node.inputs == ["q", "k0", "v0", *METADATA_INPUTS]
    assert node.attrs == {"layer": 0, "scale": SCALE, "window": None, "num_heads": HEADS,
                          "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM}
    assert node.shape == (1, HEADS, "T", HEAD_DIM) and node.origin == origin
    assert g.outputs == ["paged_attention_0"]
    assert report.changed
    assert report.stats == {"attention_layers": 1, "repeat_kv_removed": 6,
                            "kv_heads": KV_HEADS, "head_dim": HEAD_DIM}


def test_metadata_inputs_have_runtime_dtypes() -> None:
    g = attention_graph()
    kv_cache(g)
    for name, dtype, shape in (("slot_mapping", "int64", ("T",)),
                               ("block_tables", "int32", (-1, -1)),
                               ("context_lens", "int32", (-1,)),
                               ("query_start_loc", "int32", (-1,))):
        node = g.node(name)
        assert name in g.inputs
        assert (node.op, node.dtype, node.shape, node.attrs) == ("input", dtype, shape,
                                                                 {"name": name})


def test_kv_cache_layers_in_graph_meta() -> None:
    g = attention_graph(layers=2, window=16)
    _, report = kv_cache(g)
    verify(g)
    assert g.meta["kv_cache"] == {"layers": [
        {"num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float32", "window": 16},
        {"num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float32", "window": 16},
    ]}
    layers = sorted((n.attrs["layer"], n.name) for n in g.nodes() if n.op == "paged_attention")
    assert layers == [(0, "paged_attention_0"), (1, "paged_attention_1")]
    # the metadata inputs are shared by every layer, not added once per layer
    assert sum(1 for n in g.nodes() if n.op == "input") == 1 + 2 * 2 + len(METADATA_INPUTS)
    assert report.stats["attention_layers"] == 2


def test_multi_head_attention_without_repeat_kv() -> None:
    g = attention_graph(gqa=False)
    kv_cache(g)
    verify(g)
    node = g.node("paged_attention_0")
    assert node.inputs[:3] == ["q", "k0", "v0"]
    assert node.attrs["num_kv_heads"] == HEADS
    assert g.meta["kv_cache"]["layers"][0]["num_kv_heads"] == HEADS


@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_computes_what_sdpa_did(window: int | None) -> None:
    # one sequence prefilled from position 0: paged attention over the cache it fills must
    # equal dense causal (or sliding-window) attention
    g = attention_graph(layers=2, window=window)
    before = copy_graph(g)
    kv_cache(g)
    tokens = 6
    feeds = random_feeds(before, {"T": tokens})
    want = run(before, feeds, {})[0]
    got = run(g, {**feeds, **one_sequence_metadata(tokens)}, {}, kv_context(g))[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_rejects_query_heads_not_multiple_of_kv_heads() -> None:
    g = Graph()
    q = add_input(g, "q", (1, 3, "T", HEAD_DIM))
    k = add_input(g, "k", (1, 2, "T", HEAD_DIM))
    v = add_input(g, "v", (1, 2, "T", HEAD_DIM))
    # recorded by hand: torch's sdpa itself would refuse these head counts
    g.outputs = [add_op(g, "sdpa", [q, k, v], {"scale": SCALE, "window": None},
                        shape=(1, 3, "T", HEAD_DIM), dtype="float32", name="attn")]
    with pytest.raises(ValueError, match=r"attn: 3 query heads over 2 KV heads"):
        kv_cache(g)


def test_graph_without_attention_is_left_alone() -> None:
    g = Graph()
    g.outputs = [add_op(g, "neg", [add_input(g, "x", (1, "T", 8))])]
    _, report = kv_cache(g)
    assert not report.changed and report.notes == ["no attention nodes found"]
    assert g.inputs == ["x"] and "kv_cache" not in g.meta


# ---- select_logits --------------------------------------------------------------------------
def lm_head_graph() -> Graph:
    g = Graph()
    h = add_input(g, "hidden", (1, "T", 8))
    g.outputs = [add_op(g, "linear", [h, add_weight(g, "lm_head.weight", (16, 8))],
                        name="lm_head")]
    return g


def test_select_logits_gathers_rows_before_lm_head() -> None:
    g = lm_head_graph()
    before = copy_graph(g)
    _, report = select_logits(g)
    verify(g)
    idx = g.node("logits_indices")
    assert "logits_indices" in g.inputs
    assert (idx.op, idx.shape, idx.dtype) == ("input", ("N",), "int64")
    rows = g.node("select_logit_rows")
    assert rows.op == "index_select" and rows.inputs == ["hidden", "logits_indices"]
    assert rows.attrs == {"dim": 1} and rows.shape == (1, "N", 8)
    head = g.node("lm_head")
    assert head.inputs[0] == "select_logit_rows" and head.shape == (1, "N", 16)
    # the gather runs just before the head in execution order
    order = [n.name for n in g.nodes()]
    assert order.index("select_logit_rows") == order.index("lm_head") - 1
    assert report.changed and report.stats == {"vocab": 16}

    feeds = random_feeds(before, {"T": 7})
    weights = random_weights(before)
    indices = torch.tensor([6, 2, 4])
    full = run(before, feeds, weights)[0]
    got = run(g, {**feeds, "logits_indices": indices}, weights)[0]
    torch.testing.assert_close(got, full[:, indices], atol=1e-6, rtol=0)


def test_select_logits_keeps_all_rows_without_linear_head() -> None:
    g = Graph()
    g.outputs = [add_op(g, "tanh", [add_input(g, "hidden", (1, "T", 8))])]
    _, report = select_logits(g)
    assert not report.changed and "not a linear head" in report.notes[0]
    assert "logits_indices" not in g
