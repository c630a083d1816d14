"""Pipeline-parallel partitioning: layers per stage, the values crossing each boundary, and
the stages run in sequence against the single-stage engine."""

from __future__ import annotations

import json

import pytest
import torch

from tests.harness import PagedRunner, PipelineRunner
from tests.test_partition import PROMPTS, _steps


@pytest.fixture(scope="module")
def pp_engines(built):
    return lambda arch, pp, **options: built(arch, pp=pp, **options)


def test_stages_split_layers_and_send_the_residual(pp_engines):
    path = pp_engines("llama_tied", 2)
    meta = json.loads((path / "engine.json").read_text())
    assert meta["ranks"] == 2 and meta["parallel"] == {"tp": 1, "pp": 2}
    plans = [json.loads((path / f"plan.rank{r}.json").read_text()) for r in range(2)]
    total = meta["model"]["config"]["num_hidden_layers"]
    attn = [[n for n in p["nodes"] if n["op"] == "paged_attention"] for p in plans]
    assert [len(a) for a in attn] == [-(-total // 2), total // 2]
    for a, plan in zip(attn, plans):  # layers renumbered per stage, KV cache per stage
        assert [n["attrs"]["layer"] for n in a] == list(range(len(a)))
        assert len(plan["kv_cache"]["layers"]) == len(a)
    # Only stage 0 embeds, only the last stage has the LM head; the residual stream (two
    # hidden-size values: the residual and the last MLP's output, whose add is fused into
    # the next norm) is what crosses.
    ops = [{n["op"] for n in p["nodes"]} for p in plans]
    assert "embedding" in ops[0] and "embedding" not in ops[1]
    hidden = meta["model"]["config"]["hidden_size"]
    received = [i for i in plans[1]["inputs"] if i["name"].startswith("pp.")]
    assert len(received) == len(plans[0]["outputs"]) == 2
    assert all(i["shape"] == [1, "T", hidden] for i in received)
    report = json.loads((path / "report.json").read_text())["partition"]
    assert report["bytes_per_token_between_stages"] == [2 * hidden * 4]


@pytest.mark.parametrize("arch,pp", [("llama_tied", 2), ("mistral", 2), ("gpt2", 2),
                                     ("qwen2", 2)])
def test_stages_match_single_stage(pp_engines, arch, pp):
    one = PagedRunner(pp_engines(arch, 1))
    many = PipelineRunner(pp_engines(arch, pp), pp)
    for work in _steps():
        want, got = one.step(work), many.step(work)
        for sid in want:
            torch.testing.assert_close(got[sid], want[sid], rtol=0, atol=0)


# int8-sq rotates online by default: its block Hadamard GEMMs go with their layer's stage, the
# tied-free llama's head has none.
@pytest.mark.parametrize("quant", ["int8-wo", "int8-sq"])
def test_greedy_identical_int8(pp_engines, quant):
    want = PagedRunner(pp_engines("llama", 1, quant=quant)).greedy(PROMPTS, 6)
    got = PipelineRunner(pp_engines("llama", 2, quant=quant), 2).greedy(PROMPTS, 6)
    assert got == want


def test_errors(pp_engines):
    from llm_engine.builder.errors import BuildError

    with pytest.raises(BuildError, match="exceeds the model's"):
        pp_engines("llama", 64)
    with pytest.raises(BuildError, match="--pp must be a positive integer"):
        pp_engines("llama", 0)


@pytest.mark.parametrize("arch", ["llama_tied", "gpt2", "qwen2"])
def test_layers_come_from_the_graph_structure(graphs, arch):
    """A layer starts at the residual-stream norm feeding its attention; every node's layer so
    found is the one its HF module path names (nodes made from the step's inputs alone, such
    as the RoPE tables, belong to no layer: they are copied where read)."""
    from llm_engine.builder.passes import pipeline_parallel as pp

    graph, _ = graphs(arch)
    attn = [n for n in graph.nodes() if n.op == "paged_attention"]
    layers = pp.layer_of(graph, attn)
    assert layers is not None
    checked = 0
    for node in graph.nodes():
        named = pp._origin_layers(node)
        if named and node.op not in ("input", "weight", "getitem") and layers[node.name] >= 0:
            assert layers[node.name] in named, (node.name, node.op, named, layers[node.name])
            checked += 1
    assert checked > 10 * len(attn)


def test_unrecognised_structure_falls_back_to_module_paths(graphs, monkeypatch):
    from llm_engine.builder.passes import pipeline_parallel as pp

    graph, _ = graphs("llama_tied")
    by_structure, sizes = pp.assign_stages(graph, 2)
    monkeypatch.setattr(pp, "_entry", lambda graph, attn: None)
    assert pp.layer_of(graph, [n for n in graph.nodes() if n.op == "paged_attention"]) is None
    by_name, _ = pp.assign_stages(graph, 2)
    attn_stages = {n: by_name[n] for n in by_name if graph.node(n).op == "paged_attention"}
    assert attn_stages == {n: by_structure[n] for n in attn_stages}
    assert sum(sizes) == len(attn_stages)
