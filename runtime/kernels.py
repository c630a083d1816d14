"""The engine's rendered kernels: check them against their templates, then bind them.

An engine directory must never be a way to run arbitrary code, so the runtime does not trust
`kernels/*.py`: it re-renders every kernel from the template, parameters and node list the
plan records and refuses the engine unless the stored file is byte-identical (and named by
the hash of that source). Only then are the modules imported. Rendering needs jinja2 only;
triton is imported when kernels are bound (the Triton backend).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_engine.runtime.engine_dir import EngineLoadError

BACKENDS = ("auto", "reference", "triton", "onnx")


def verify_kernels(engine_dir: Path, plan: dict[str, Any]) -> dict[str, str]:
    """kernel name -> verified source, for every kernel the plan lists."""
    from llm_engine.kernels.codegen import KERNEL_NAME, TemplateError, kernel_name
    from llm_engine.kernels.triton import registry

    verified: dict[str, str] = {}
    rendered: dict[str, dict[str, str]] = {}
    kernels = plan.get("kernels", {})
    if not isinstance(kernels, dict):
        raise EngineLoadError("plan 'kernels' is not a mapping; rebuild the engine")
    # the nodes a kernel may claim: the plan's own nodes that list it
    claims: dict[str, set[str]] = {}
    for node in plan.get("nodes", []):
        if isinstance(node, dict) and isinstance(node.get("kernel"), list):
            for k in node["kernel"]:
                claims.setdefault(str(k), set()).add(str(node.get("name")))
    for name, info in kernels.items():
        if not isinstance(name, str) or not KERNEL_NAME.match(name) or not isinstance(info, dict):
            raise EngineLoadError(f"plan kernel {str(name)[:40]!r} is not a kernel entry the "
                                  "builder writes; rebuild the engine")
        nodes = info.get("nodes")
        if not _claims_hold(nodes, claims.get(name, set())):
            raise EngineLoadError(f"kernel {name}: its nodes are not plan nodes that use it; "
                                  "the plan was modified, rebuild the engine")
        path = engine_dir / "kernels" / f"{name}.py"
        try:
            stored = path.read_text()
        except OSError:
            raise EngineLoadError(f"{path} is missing; the engine is incomplete, rebuild it") \
                from None
        key = repr((info["family"], sorted(info["params"].items()), info["nodes"]))
        try:
            if key not in rendered:
                rendered[key] = registry.render(info["family"], info["params"], info["nodes"])
            want = rendered[key][info["template"]]
        except (TemplateError, KeyError, ValueError, TypeError) as e:
            raise EngineLoadError(f"kernel {name}: cannot re-render it from its template "
                                  f"({e}); rebuild the engine with this llm-engine") from e
        if stored != want or kernel_name(stored) != name:
            raise EngineLoadError(
                f"{path} is not what templates/{info['template']}.py.j2 renders for its "
                "recorded parameters; refusing to run modified kernel code. Rebuild the engine")
        verified[name] = stored
    return verified


def _claims_hold(nodes: Any, users: set[str]) -> bool:
    """A kernel's recorded nodes are plan nodes that use it, the list possibly ending in
    '... N more' (long lists are cut in the header) where N counts exactly the rest."""
    from llm_engine.kernels.codegen import MORE_NODES

    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes):
        return False
    more = MORE_NODES.match(nodes[-1])
    listed = nodes[:-1] if more else nodes
    if len(set(listed)) != len(listed) or not set(listed) <= users:
        return False
    return more is None or int(more.group(1)) == len(users - set(listed))


def bind_kernels(plan: dict[str, Any], sources: dict[str, str], block_size: int
                 ) -> dict[str, Callable[..., Any]]:
    """node name -> kernel callable (the reference op's calling convention)."""
    from llm_engine.kernels.triton import registry

    by_group: dict[tuple[str, ...], Callable[..., Any]] = {}
    bound: dict[str, Callable[..., Any]] = {}
    for node in plan["nodes"]:
        names = tuple(node.get("kernel", ()))
        if not names:
            continue
        if names not in by_group:
            info = plan["kernels"][names[0]]
            family, params = info["family"], dict(info["params"])
            group_sources = {plan["kernels"][n]["template"]: sources[n] for n in names}
            if family == "attention" and params.get("block_size") != block_size:
                # The cache's block size is a runtime choice: render for it from the trusted
                # templates rather than use the engine's files.
                params["block_size"] = block_size
                group_sources = registry.render(family, params, info["nodes"])
            by_group[names] = registry.bind(family, params, group_sources)
        bound[node["name"]] = by_group[names]
    return bound


def choose_backend(requested: str, device: str, files: Any = None) -> str:
    """The step backend. `files` (runtime.engine_dir.EngineFiles) is given for a single-rank
    engine, the only kind the ONNX fast path runs: "auto" picks it on CPU when the engine
    has a graph for its plan."""
    if requested not in BACKENDS:
        raise ValueError(f"kernels={requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested == "onnx":
        if device != "cpu":
            raise EngineLoadError("kernels=onnx is the CPU backend; use triton on a GPU")
        why = "a multi-rank engine" if files is None else _onnx_unavailable(files)
        if why:
            raise EngineLoadError(f"kernels=onnx cannot run this engine: {why}; "
                                  "use kernels=reference")
        return requested
    if requested == "auto":
        if device.startswith("cuda"):
            return "triton"
        if files is not None and _onnx_unavailable(files) is None:
            return "onnx"
        return "reference"
    return requested


def _onnx_unavailable(files: Any) -> str | None:
    from llm_engine.runtime.onnx_backend import available

    return available(files.path, files.meta, files.plan)
