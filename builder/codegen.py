"""Codegen: give every kernel node of the final graph a Triton kernel rendered from a template.

For each node, the family registered for its op checks the node (dtypes, shapes, attributes)
and returns template parameters, or declines and the node keeps its torch reference op (the
report lists each declined op, so a fallback is never silent). Nodes with equal (family,
params) share one rendering, whose header lists them all; each rendered source is named by
its hash, so identical kernels are written once.

Renderings are cached on disk keyed by (template sources, params, nodes, triton version), so
rebuilding an engine whose shapes did not change skips rendering.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from llm_engine.builder.ir import Graph
from llm_engine.builder.passes.report import PassReport
from llm_engine.kernels.codegen import kernel_name
from llm_engine.kernels.triton import registry

# Ops that move no data worth a kernel: inputs, weights, views the runtime does for free.
_NOT_KERNELS = {"input", "weight", "reshape", "transpose", "permute", "unsqueeze", "squeeze",
                "expand", "slice", "select", "getitem"}
MAX_LISTED_NODES = 6


def _shapes(graph: Graph, node) -> tuple[list[tuple], list[str]]:
    shapes, dtypes = [], []
    for name in node.inputs:
        producer = graph.node(name)
        shapes.append(tuple(producer.shape))
        dtypes.append(producer.dtype)
    return shapes, dtypes


def _kv_dtype(graph: Graph, node) -> str | None:
    layers = (graph.meta.get("kv_cache") or {}).get("layers", [])
    layer = node.attrs.get("layer")
    return layers[layer]["dtype"] if isinstance(layer, int) and layer < len(layers) else None


def codegen(graph: Graph, options: Any = None) -> tuple[Graph, PassReport]:
    report = PassReport("codegen")
    groups: dict[str, dict[str, Any]] = {}
    declined: dict[str, int] = {}
    for node in graph.nodes():
        if node.op in _NOT_KERNELS or (isinstance(node.shape, list) and node.op == "cat"):
            continue
        shapes, dtypes = _shapes(graph, node)
        choice = registry.choose(node.op, node.attrs, shapes, dtypes, node.dtype,
                                 kv_cache_dtype=_kv_dtype(graph, node))
        if choice is None:
            declined[node.op] = declined.get(node.op, 0) + 1
            continue
        family, params = choice
        key = json.dumps([family, params], sort_keys=True)
        groups.setdefault(key, {"family": family, "params": params, "nodes": []})
        groups[key]["nodes"].append(node.name)

    tuned = _autotune(groups, options, report)

    kernels: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    node_kernels: dict[str, list[str]] = {}
    cache_hits = 0
    templates_key = _templates_key()
    for group in groups.values():
        listed = _listed(group["nodes"])
        rendered, hit = _render_cached(group["family"], group["params"], listed, templates_key)
        cache_hits += hit
        names = []
        for template, source in rendered.items():
            name = kernel_name(source)
            sources[name] = source
            kernels[name] = {"family": group["family"], "template": template,
                             "params": group["params"], "nodes": listed}
            names.append(name)
        for n in group["nodes"]:
            node_kernels[n] = names
    graph.meta["codegen"] = {"kernels": kernels, "node_kernels": node_kernels,
                             "sources": sources}
    covered = len(node_kernels)
    report.stats.update({"kernel_nodes": covered, "kernels": len(kernels),
                         "renderings": len(groups), "cache_hits": cache_hits,
                         "reference_fallback": sum(declined.values()),
                         "autotuned_gemms": tuned})
    by_family: dict[str, int] = {}
    for info in kernels.values():
        by_family[info["template"]] = by_family.get(info["template"], 0) + 1
    report.stats.update({f"template.{k}": v for k, v in sorted(by_family.items())})
    for op, count in sorted(declined.items()):
        report.notes.append(f"{count} {op} node(s) keep the torch reference (no template "
                            "accepts them)")
    return graph, report


def _autotune(groups: dict[str, dict[str, Any]], options: Any, report: PassReport) -> int:
    """Time GEMM tilings on the build GPU when building for CUDA; returns groups tuned."""
    if getattr(options, "device", "cpu") != "cuda":
        return 0
    import torch

    from llm_engine.kernels.triton import gemm

    for group in groups.values():  # the family chose tilings for this host; target the GPU's
        if group["family"] == "gemm":
            p = group["params"]
            group["params"] = {**p, **gemm.configs(None, p["N"], p["K"], "cuda",
                                                   dtype=p["a_dtype"],
                                                   b_format=p.get("b_format", "dense"),
                                                   group_size=p.get("group_size"))[0]}

    if not torch.cuda.is_available():
        report.notes.append("autotune skipped: no CUDA device on the build host; GEMMs use "
                            "the template's default tiling")
        return 0
    from llm_engine.builder import autotune

    count = 0
    for group in groups.values():
        if group["family"] == "gemm":
            group["params"], table = autotune.tune(group["params"], autotune.gpu_time)
            report.stats.setdefault("autotune", {})[group["nodes"][0]] = table
            count += 1
    return count


def _listed(nodes: list[str]) -> list[str]:
    if len(nodes) <= MAX_LISTED_NODES:
        return list(nodes)
    return [*nodes[:MAX_LISTED_NODES], f"... {len(nodes) - MAX_LISTED_NODES} more"]


def _cache_dir() -> Path:
    root = os.environ.get("LLM_ENGINE_CACHE") or Path.home() / ".cache" / "llm-engine"
    return Path(root) / "rendered"


def _templates_key() -> str:
    """What a rendering depends on besides its parameters: the template sources and the
    triton version (read once per build, not once per kernel)."""
    from llm_engine import templates

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    digest = hashlib.sha256(triton_version.encode())
    for path in sorted(templates.DIR.glob("*.py.j2")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _render_cached(family: str, params: dict[str, Any], nodes: list[str], templates_key: str
                   ) -> tuple[dict[str, str], int]:
    key = hashlib.sha256(json.dumps([family, params, nodes, templates_key],
                                    sort_keys=True).encode()).hexdigest()[:32]
    path = _cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text()), 1
    except (OSError, ValueError):
        pass
    rendered = registry.render(family, params, nodes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rendered))
        tmp.replace(path)
    except OSError:  # a read-only home is no reason to fail a build
        pass
    return rendered, 0
