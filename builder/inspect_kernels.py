"""`engine inspect --kernels`: the rendered Triton kernels and the nodes each implements.

Read from plan.rank0.json and the kernels/ folder only, like the rest of inspect; it also
lists the kernel-worthy ops that no template covered and so run their torch reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_engine.builder.inspect import engine_path, op_kind, read_json


def kernel_table(engine_dir: Path | str) -> dict[str, Any]:
    """The engine's rendered kernels (name, template, nodes) and the kernel-worthy nodes that
    kept their torch reference op."""
    path = engine_path(engine_dir)
    plan = read_json(path / "plan.rank0.json", required=True) or {}
    kernels = plan.get("kernels", {})
    users: dict[str, list[str]] = {}
    fallback: dict[str, int] = {}
    for node in plan.get("nodes", []):
        for name in node.get("kernel", []):
            users.setdefault(name, []).append(node["name"])
        if not node.get("kernel") and op_kind(node.get("op", "")) not in ("source", "view"):
            fallback[node["op"]] = fallback.get(node["op"], 0) + 1
    rows = [{"kernel": name, "template": info["template"], "family": info["family"],
             "bytes": (path / "kernels" / f"{name}.py").stat().st_size
             if (path / "kernels" / f"{name}.py").is_file() else None,
             "nodes": users.get(name, [])} for name, info in sorted(
                 kernels.items(), key=lambda kv: (kv[1]["template"], kv[0]))]
    return {"kernels": rows, "reference_fallback": dict(sorted(fallback.items()))}


def print_kernels(table: dict[str, Any], as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(table, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(table['kernels'])} rendered kernels")
    for col in ("kernel", "template", "nodes"):
        t.add_column(col)
    for row in table["kernels"]:
        nodes = row["nodes"]
        shown = ", ".join(nodes[:4]) + (f" (+{len(nodes) - 4})" if len(nodes) > 4 else "")
        t.add_row(row["kernel"], row["template"], f"{len(nodes)}: {shown}")
    console = Console()
    console.print(t)
    if table["reference_fallback"]:
        console.print("torch reference (no template): " + ", ".join(
            f"{op}×{n}" for op, n in table["reference_fallback"].items()))
