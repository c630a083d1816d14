"""Golden engines: what the builder emits for a fixed set of tiny models, frozen in
`tests/golden/` (tinygrad's "process replay", Inductor's checks of generated source).

For each case below the test builds the engine and compares, byte for byte, a text snapshot
of it with the stored one: each plan's node list (name, op, inputs, attributes, shape, dtype,
kernels), its weight list, every rendered kernel's source and the ONNX graph's node list. A
restructuring must leave all of it unchanged; a change that is meant (a new fusion, a new
template) regenerates it with `make golden` and says in its commit why the builder's output
changed.

The snapshot holds nothing that depends on the host: GEMM tilings are the CPU candidates (the
build host's GPU would otherwise choose them), and no case calibrates a value into the plan
(a quantized KV cache's scales would vary in the last bits between CPUs)."""

from __future__ import annotations

import difflib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"

# case -> (tiny architecture, build options): fp32 Llama with grouped-query attention, one
# engine per quantized weight format, and a tensor-parallel split.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa-fp32": ("llama", {}),
    "int8_channel": ("llama_wide", {"quant": "int8-wo"}),
    "int8_channel_a8": ("llama_wide", {"quant": "int8-sq"}),
    "int4_group": ("llama_wide", {"quant": "int4-awq"}),
    "fp8_channel_a8": ("llama_wide", {"quant": "fp8"}),
    "fp8_channel_a8_token": ("llama_wide", {"quant": "fp8", "fp8_act_scales": "per-token"}),
    "fp8_channel_a8_group": ("llama_wide", {"quant": "fp8",
                                            "fp8_act_scales": "per-token-group"}),
    "llama-tp2": ("llama", {"tp": 2}),
}


def _attrs(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def plan_text(plan: dict[str, Any]) -> str:
    """One line per node, then the weights: the shape of what the builder decided."""
    lines = [f"inputs: {_attrs(plan['inputs'])}", f"outputs: {_attrs(plan['outputs'])}"]
    for node in plan["nodes"]:
        kernels = f" kernels={','.join(node['kernel'])}" if node.get("kernel") else ""
        lines.append(f"{node['name']} = {node['op']}({', '.join(node['inputs'])}) "
                     f"{_attrs(node['attrs'])} -> {node['dtype']}{_attrs(node['shape'])}"
                     f"{kernels}")
    lines.append("weights:")
    lines += [f"  {name}: {w['dtype']}{_attrs(w['shape'])}"
              for name, w in sorted(plan["weights"].items())]
    return "\n".join(lines) + "\n"


def onnx_text(path: Path) -> str:
    """The ONNX graph's inputs, outputs and nodes (op, name, inputs, outputs, attributes);
    initializers by name, shape and type only."""
    import onnx
    from onnx import helper

    model = onnx.load(path, load_external_data=False)
    g = model.graph
    lines = [f"opset: {sorted((o.domain or 'ai.onnx', o.version) for o in model.opset_import)}"]
    lines += [f"input {i.name}" for i in g.input] + [f"output {o.name}" for o in g.output]
    lines += [f"initializer {t.name}: {onnx.TensorProto.DataType.Name(t.data_type)}"
              f"{list(t.dims)}" for t in g.initializer]
    for node in g.node:
        attrs = {}
        for a in node.attribute:
            value = helper.get_attribute_value(a)
            if isinstance(value, onnx.TensorProto):
                value = f"tensor{list(value.dims)}"
            elif isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, list):
                value = [v.decode() if isinstance(v, bytes) else v for v in value]
            attrs[a.name] = value
        domain = f"{node.domain}." if node.domain else ""
        lines.append(f"{domain}{node.op_type} {node.name}: {', '.join(node.input)} -> "
                     f"{', '.join(node.output)} {_attrs(attrs)}")
    return "\n".join(lines) + "\n"


def snapshot(engine: Path, case: str) -> dict[str, str]:
    """relative path under tests/golden -> text, for one built engine."""
    out: dict[str, str] = {}
    for plan_file in sorted(engine.glob("plan.rank*.json")):
        plan = json.loads(plan_file.read_text())
        out[f"{case}/{plan_file.stem}.txt"] = plan_text(plan)
        for name in plan["kernels"]:  # shared across cases: identical kernels, one file
            out[f"kernels/{name}.py"] = (engine / "kernels" / f"{name}.py").read_text()
    if (engine / "model.onnx").exists():
        out[f"{case}/onnx.txt"] = onnx_text(engine / "model.onnx")
    return out


def _implements(source: str) -> str:
    header = source.split("\n", 3)[:3]
    return next((line for line in header if line.startswith("# implements:")), header[0])


@pytest.fixture(scope="module")
def golden_snapshot(checkpoints, tmp_path_factory) -> dict[str, str]:
    from llm_engine.kernels.triton import gemm
    from tests.models import build_tiny_engine

    root = tmp_path_factory.mktemp("golden")
    out: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gemm, "default_device", lambda: "cpu")
        mp.setenv("LLM_ENGINE_CACHE", str(root / "cache"))  # render, do not reuse renderings
        for case, (arch, options) in CASES.items():
            engine = build_tiny_engine(checkpoints(arch)[0], root / case, **options)
            out.update(snapshot(engine, case))
    return out


def test_builder_output_matches_golden(golden_snapshot, request):
    if request.config.getoption("--update-golden"):
        if GOLDEN.exists():
            shutil.rmtree(GOLDEN)
        for rel, text in golden_snapshot.items():
            (GOLDEN / rel).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / rel).write_text(text)
        pytest.skip(f"wrote {len(golden_snapshot)} golden files to {GOLDEN}")
    stored = {p.relative_to(GOLDEN).as_posix(): p.read_text()
              for p in sorted(GOLDEN.rglob("*")) if p.is_file()}
    assert stored, "tests/golden is empty: run `make golden`"
    problems: list[str] = []
    new, gone = sorted(set(golden_snapshot) - set(stored)), sorted(set(stored) - set(golden_snapshot))
    pairs = [(rel, rel) for rel in sorted(set(stored) & set(golden_snapshot))]
    # A kernel is named by its source's hash, so a changed kernel is a new name: pair it with
    # the old one that implemented the same nodes, to show what changed in it.
    old_by_nodes = {_implements(stored[rel]): rel for rel in gone if rel.startswith("kernels/")}
    for rel in new:
        old = old_by_nodes.pop(_implements(golden_snapshot[rel]), None) \
            if rel.startswith("kernels/") else None
        if old:
            pairs.append((old, rel))
            gone.remove(old)
        else:
            problems.append(f"new in the build, not in tests/golden: {rel}")
    problems += [f"in tests/golden, no longer built: {rel}" for rel in gone]
    for old, rel in pairs:
        if stored[old] != golden_snapshot[rel]:
            diff = difflib.unified_diff(stored[old].splitlines(), golden_snapshot[rel].splitlines(),
                                        f"golden/{old}", f"built/{rel}", lineterm="", n=1)
            problems.append("\n".join(list(diff)[:40]))
    assert not problems, (
        "the builder's output changed. If that is intended, run `make golden` and say why in "
        "the commit:\n" + "\n".join(problems[:10]))
