"""`engine inspect --graph`: the plan as a graphviz drawing (.dot text, or .svg/.png via `dot`).

Kept apart from the summary because drawing has concerns the table never needs: which nodes
to draw under a --layers cut, weights folded into tooltips, keeping a cut drawing connected,
and running graphviz. Like the rest of inspect it reads only the engine's files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from llm_engine.builder.inspect import COLOURS, InspectError, engine_path, op_kind, read_json

# HF module paths name decoder layers `model.layers.3`, `transformer.h.3`, ...
_LAYER_IN_PATH = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_LAYER_IN_NAME = re.compile(r"(?:^|_)(?:layers|layer|h|blocks|block)_(\d+)(?:_|$)")


def node_layer(node: dict[str, Any]) -> int | None:
    """The first decoder layer a node came from, or None for model-level nodes.

    A fused node can span a layer boundary (the residual add of layer i fused with the norm
    of layer i+1, or of the final norm); it counts as model-level if any part of it is, so the
    final norm survives a --layers cut."""
    layers = []
    for origin in node.get("origin") or []:
        module = origin.rpartition("@")[2]
        match = _LAYER_IN_PATH.search(module)
        if match is None:
            return None
        layers.append(int(match.group(1)))
    if layers:
        return min(layers)
    if isinstance(node.get("attrs", {}).get("layer"), int):
        return node["attrs"]["layer"]
    match = _LAYER_IN_NAME.search(node.get("name", ""))
    return int(match.group(1)) if match else None


def _short_shape(shape: Any) -> str:
    if isinstance(shape, list) and shape and isinstance(shape[0], list):
        return ", ".join(_short_shape(s) for s in shape)
    if isinstance(shape, list):
        # -1 marks a runtime-sized dim (block tables, sequence lists)
        return "×".join("?" if d == -1 else str(d) for d in shape) or "scalar"
    return str(shape)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(**attrs: str) -> str:
    return "[" + ", ".join(f"{k}={_quote(v)}" for k, v in attrs.items()) + "]"


def _keep(node: dict[str, Any], layers: int) -> bool:
    layer = node_layer(node)
    return layers <= 0 or layer is None or layer < layers


def plan_to_dot(plan: dict[str, Any], layers: int = 1) -> str:
    """DOT text for a plan; `layers` > 0 keeps only the first that many decoder layers.

    Weight nodes are left out (every gemm and norm has one, and their edges swamp the drawing);
    each consumer lists its weights in its tooltip instead."""
    nodes = {n["name"]: n for n in plan.get("nodes", [])}
    outputs = set(plan.get("outputs", []))
    shown = [n for n in nodes.values() if n["op"] != "weight" and _keep(n, layers)]
    shown_names = {n["name"] for n in shown}
    hidden = [n for n in nodes.values() if n["op"] != "weight" and n["name"] not in shown_names]

    # Bounded network-simplex passes: without them dot spends minutes placing a full 30-layer
    # plan (every layer reads the same attention metadata and rotary inputs); with them, seconds.
    lines = ["digraph plan {", "  rankdir=TB;", "  nslimit=2; nslimit1=2;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  edge [color="#777777", arrowsize=0.6];']
    for n in shown:
        kind = op_kind(n["op"])
        label = n["attrs"].get("name", n["name"]) if n["op"] == "input" else n["op"]
        label += "\n" + _short_shape(n.get("shape"))
        weights = [nodes[i]["attrs"].get("name", i) for i in n.get("inputs", [])
                   if i in nodes and nodes[i]["op"] == "weight"]
        tooltip = n["name"] + "".join(f"\nweight {w}" for w in weights)
        extra = {"peripheries": "2"} if n["name"] in outputs else {}
        lines.append(f"  {_quote(n['name'])} " + _attrs(
            label=label, fillcolor=COLOURS.get(kind, "#ffffff"), tooltip=tooltip, **extra) + ";")

    # The cut-off layers become one node so the drawing stays connected end to end.
    elided = "__elided_layers__"
    if hidden:
        cut = [layer for n in hidden if (layer := node_layer(n)) is not None]
        first, last = min(cut, default=layers), max(cut, default=layers)
        lines.append(f"  {_quote(elided)} " + _attrs(
            label=f"layers {first}–{last}\n({len(hidden)} ops not drawn)", shape="box",
            style="dashed", tooltip="use --layers 0 to draw every layer") + ";")
    edges: dict[tuple[str, str], None] = {}  # a dict keeps first-seen order and dedups
    for n in nodes.values():
        if n["op"] == "weight":
            continue
        dst = n["name"] if n["name"] in shown_names else elided
        for i in n.get("inputs", []):
            if i not in nodes or nodes[i]["op"] == "weight":
                continue
            src = i if i in shown_names else elided
            if src != dst:
                edges[(src, dst)] = None
    lines += [f"  {_quote(src)} -> {_quote(dst)};" for src, dst in edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_graph(engine_dir: Path | str, out_path: Path | str, layers: int = 1) -> Path:
    """Write the plan's graph to out_path: .dot as text, .svg/.png rendered by graphviz."""
    out = Path(out_path)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("dot", "svg", "png"):
        raise InspectError(f"--graph {out}: unknown format {out.suffix or '(no suffix)'!r}; "
                           "use a .svg, .png or .dot file name")
    if layers < 0:
        raise InspectError(f"--layers {layers} is negative; pass 0 for all layers or a count")
    dot_exe = shutil.which("dot") if fmt != "dot" else None
    if fmt != "dot" and dot_exe is None:
        raise InspectError("graphviz 'dot' not found; install graphviz (apt-get install "
                           "graphviz) or use --graph out.dot")
    path = engine_path(engine_dir)
    read_json(path / "engine.json", required=True)
    plan = read_json(path / "plan.rank0.json", required=True)
    assert plan is not None
    text = plan_to_dot(plan, layers)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if dot_exe is None:
            out.write_text(text)
            return out
        result = subprocess.run([dot_exe, f"-T{fmt}", "-o", str(out)], input=text.encode(),
                                capture_output=True, check=False)
    except OSError as e:
        raise InspectError(f"cannot write {out} ({e.strerror or e}); pick a writable path") from e
    if result.returncode != 0:
        why = (result.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[0]
        raise InspectError(f"graphviz dot failed on the plan graph ({why}); try --graph out.dot")
    return out
