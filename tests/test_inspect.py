"""`engine inspect`: the summary agrees with the engine's files, the CLI prints it as a table or
parseable JSON, the graph drawing honours --layers, and bad input is one line and exit 2."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import pytest
from click.testing import CliRunner

from llm_engine.builder.cli import main
from llm_engine.builder.inspect import InspectError, summarize
from llm_engine.builder.inspect_graph import draw_graph, node_layer


@pytest.fixture(scope="module")
def engine(engines):
    return engines("llama")


@pytest.fixture(scope="module")
def plan(engine):
    return json.loads((engine / "plan.rank0.json").read_text())


def _inspect(*args: str):
    return CliRunner().invoke(main, ["inspect", *args])


def _dot_nodes(text: str) -> set[str]:
    return set(re.findall(r'^  "([^"]+)" \[', text, flags=re.MULTILINE))


def _dot_edges(text: str) -> list[tuple[str, str]]:
    return re.findall(r'^  "([^"]+)" -> "([^"]+)";', text, flags=re.MULTILINE)


def test_summary_matches_the_engine_files(engine, plan):
    s = summarize(engine)
    report = json.loads((engine / "report.json").read_text())
    assert s["model"]["architecture"] == "LlamaForCausalLM"
    assert s["target"] == {"device": "cpu", "dtype": "float32"}
    assert s["format_version"] == 1 and s["builder_version"]
    assert s["ops"] == dict(Counter(n["op"] for n in plan["nodes"]))
    assert s["ops"] == report["op_counts"]["final"]
    assert sum(s["ops_by_kind"].values()) == len(plan["nodes"])
    assert s["ops_by_kind"]["attention"] == 2  # two decoder layers
    assert s["op_totals"]["final"] == len(plan["nodes"])
    assert s["op_totals"]["traced"] >= s["op_totals"]["lowered"] > s["op_totals"]["final"]
    assert s["fusions"] and "nodes_before" not in s["fusions"]
    # Weights come from the safetensors header; report.json counted them while writing.
    assert {k: v["bytes"] for k, v in s["weights"].items()} == \
        report["weights"]["bytes_by_dtype"]
    assert sum(v["count"] for v in s["weights"].values()) == report["weights"]["count"]
    assert s["disk_bytes"] > report["weights"]["bytes"]
    assert s["kv_cache"]["layers"] == 2
    assert (s["kv_cache"]["num_kv_heads"], s["kv_cache"]["head_dim"]) == (2, 12)
    mem = s["memory"]
    assert mem["activation_bytes_planned"] <= mem["activation_bytes_no_reuse"]
    assert s["build_seconds"] > 0


def test_summary_survives_missing_optional_files(engine, tmp_path):
    copy = tmp_path / "e"
    shutil.copytree(engine, copy)
    (copy / "report.json").unlink()
    (copy / "plan.rank0.json").unlink()
    s = summarize(copy)
    assert s["ops"] == {} and s["fusions"] == {} and s["memory"] is None
    assert s["build_seconds"] is None and s["weights"]


def test_cli_table_and_json(engine, plan):
    result = _inspect(str(engine))
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.stdout and "paged_attention" in result.stdout
    result = _inspect(str(engine), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["op_totals"]["final"] == len(plan["nodes"])


def test_dot_graph_and_layer_cut(engine, plan, tmp_path):
    one, every = tmp_path / "one.dot", tmp_path / "all.dot"
    result = _inspect(str(engine), "--graph", str(one), "--layers", "1")
    assert result.exit_code == 0, result.output
    draw_graph(engine, every, layers=0)
    text_one, text_all = one.read_text(), every.read_text()
    for text in (text_one, text_all):
        assert text.startswith("digraph plan {") and text.rstrip().endswith("}")
        nodes = _dot_nodes(text)
        assert all(a in nodes and b in nodes for a, b in _dot_edges(text))  # no dangling edge
        for op in ("embedding", "paged_attention", "linear", "rms_norm"):
            assert f'label="{op}\\n' in text, op
    by_name = {n["name"]: n for n in plan["nodes"]}
    nodes_one, nodes_all = _dot_nodes(text_one), _dot_nodes(text_all)
    # Every non-weight op drawn at --layers 0; weights only in tooltips.
    assert nodes_all == {n for n, v in by_name.items() if v["op"] != "weight"}
    assert "model.layers.0.self_attn.o_proj.weight" in text_all
    assert len(nodes_one) < len(nodes_all)
    drawn_layers = {node_layer(by_name[n]) for n in nodes_one if n in by_name}
    assert drawn_layers == {None, 0}
    # Inputs, outputs and the final norm survive the cut; the rest is one elided node.
    kept = nodes_one & nodes_all
    assert {i["node"] for i in plan["inputs"]} <= kept and set(plan["outputs"]) <= kept
    assert any(by_name[n]["op"].endswith("rms_norm") and "model.norm" in
               " ".join(by_name[n]["origin"]) for n in kept)
    assert "__elided_layers__" in nodes_one


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz 'dot' not installed")
def test_svg_graph(engine, tmp_path):
    out = tmp_path / "g.svg"
    result = _inspect(str(engine), "--graph", str(out))
    assert result.exit_code == 0, result.output
    assert "<svg" in out.read_text() and "paged_attention" in out.read_text()


def test_svg_without_graphviz_says_how(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(InspectError, match=r"graphviz 'dot' not found.*\.dot"):
        draw_graph(engine, tmp_path / "g.png")


def _one_line_error(result, *needles: str) -> None:
    err = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def test_missing_dir(tmp_path):
    _one_line_error(_inspect(str(tmp_path / "nope")), "not found", "engine build")


def test_dir_without_engine_json(tmp_path):
    _one_line_error(_inspect(str(tmp_path)), "engine.json", "not found")


def test_corrupt_engine_json(engine, tmp_path):
    copy = tmp_path / "e"
    shutil.copytree(engine, copy)
    (copy / "engine.json").write_text("{not json")
    _one_line_error(_inspect(str(copy)), "engine.json", "not valid JSON", "--force")


def test_unknown_graph_suffix(engine, tmp_path):
    _one_line_error(_inspect(str(engine), "--graph", str(tmp_path / "g.pdf")),
                    ".pdf", ".svg, .png or .dot")


def test_onnx_node_counts_per_layer(engine, plan):
    """`--onnx` counts the fast path's nodes per decoder layer: every node named after the
    plan node it lowers, the layers' counts and the rest adding up to the graph."""
    import onnx

    result = _inspect(str(engine), "--onnx", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    model = onnx.load(engine / "model.onnx", load_external_data=False)
    assert summary["nodes"] == len(model.graph.node)
    layers = sum(n["op"] == "paged_attention" for n in plan["nodes"])
    assert summary["layers"] == layers == len(summary["per_layer"])
    assert sum(summary["per_layer"]) + summary["outside_layers"] == summary["nodes"]
    assert len(set(summary["per_layer"])) <= 2 and min(summary["per_layer"]) > 10
    plan_names = {n["name"] for n in plan["nodes"]}
    named = [n.name.split("/", 1)[0] for n in model.graph.node if "/" in n.name]
    assert named and set(named) <= plan_names
    assert summary["by_op_type"]["MatMul"] >= 4 * layers  # qkv, o, gate/up, down per layer
    ran = summary["onnxruntime"]  # the graph onnxruntime runs here: fused, names mostly kept
    assert 0 < ran["nodes"] <= summary["nodes"] and ran["layers"] == layers
    assert sum(ran["per_layer"]) + ran["outside_layers"] == ran["nodes"]
    text = _inspect(str(engine), "--onnx")
    assert "per decoder layer" in text.stdout and "after onnxruntime" in text.stdout


def test_onnx_counts_need_the_fast_path_graph(built):
    result = _inspect(str(built("llama", tp=2)), "--onnx")
    assert result.exit_code != 0 and "no CPU fast-path graph" in result.output


def test_onnx_counts_read_only_the_graph_the_builder_writes(engine, tmp_path):
    """engine.json is untrusted: a cpu_graph naming a file outside the engine is refused."""
    from llm_engine.builder.inspect_onnx import GRAPH_FILE
    from llm_engine.runtime.onnx_backend import ONNX_FILE

    assert GRAPH_FILE == ONNX_FILE
    path = tmp_path / "engine"
    shutil.copytree(engine, path)
    shutil.copy(path / "model.onnx", tmp_path / "outside.onnx")
    meta = json.loads((path / "engine.json").read_text())
    meta["cpu_graph"]["file"] = "../outside.onnx"
    (path / "engine.json").write_text(json.dumps(meta))
    result = _inspect(str(path), "--onnx")
    assert result.exit_code != 0 and "refusing to read another file" in result.output
