"""Verify an engine's stored kernels against their templates, then bind them for the Triton
backend. (The kernels themselves are llm_engine.kernels and the engine's `kernels/*.py`;
runtime.backend decides which backend runs and calls this.)

An engine directory must never be a way to run arbitrary code, and its author writes the plan
as well as `kernels/*.py`, so neither is taken on trust. For every kernel the runtime
1. checks that the nodes it claims are plan nodes that use it;
2. derives its parameters from each of those nodes (op, attributes, input shapes and dtypes)
   with the kernel family's own checker, as the builder did, and requires the recorded
   parameters to be exactly those (a GEMM tiling: one of the template's candidates);
3. re-renders it (the renderer admits only numbers, booleans and allow-listed words) and
   requires the stored file to be byte-identical and named by the hash of that source.
Only then are the modules run. Rendering needs jinja2 only; triton is imported when kernels
are bound (the Triton backend).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_engine.runtime.engine_dir import EngineLoadError


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
    users: dict[str, list[dict[str, Any]]] = {}
    by_name: dict[str, dict[str, Any]] = {}
    for node in plan.get("nodes", []):
        if isinstance(node, dict):
            by_name[str(node.get("name"))] = node
            for k in node.get("kernel") if isinstance(node.get("kernel"), list) else ():
                users.setdefault(str(k), []).append(node)
    for name, info in kernels.items():
        if not isinstance(name, str) or not KERNEL_NAME.match(name) or not isinstance(info, dict):
            raise EngineLoadError(f"plan kernel {str(name)[:40]!r} is not a kernel entry the "
                                  "builder writes; rebuild the engine")
        nodes = info.get("nodes")
        if not _claims_hold(nodes, {str(n.get("name")) for n in users.get(name, ())}):
            raise EngineLoadError(f"kernel {name}: its nodes are not plan nodes that use it; "
                                  "the plan was modified, rebuild the engine")
        for node in users[name]:
            why = _params_differ(plan, by_name, node, info)
            if why:
                raise EngineLoadError(f"kernel {name}: its parameters are not what the "
                                      f"{info.get('family')!r} kernels derive from plan node "
                                      f"{str(node.get('name'))[:80]!r} ({why}); the plan was "
                                      "modified, rebuild the engine")
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


def _params_differ(plan: dict[str, Any], by_name: dict[str, dict[str, Any]],
                   node: dict[str, Any], info: dict[str, Any]) -> str | None:
    """Why `info` (a kernel's plan entry) is not what the builder's checker makes of `node`,
    or None when it is. The checker sees the node as the builder's codegen did: its op and
    attributes, its inputs' shapes and dtypes, its layer's KV-cache dtype."""
    from llm_engine.kernels.triton import registry

    try:
        inputs = [by_name[i] for i in node["inputs"]]
        layers = (plan.get("kv_cache") or {}).get("layers") or []
        layer = node["attrs"].get("layer")
        kv_dtype = layers[layer]["dtype"] if type(layer) is int and 0 <= layer < len(layers) \
            else None
        block_size = info["params"].get("block_size", registry.DEFAULT_BLOCK_SIZE)
        derived = registry.choose(node["op"], node["attrs"], [tuple(n["shape"]) for n in inputs],
                                  [n["dtype"] for n in inputs], node["dtype"],
                                  kv_cache_dtype=kv_dtype, block_size=block_size)
        if derived is None:
            return "no kernel family takes that node"
        family, params = derived
        if family != info["family"]:
            return f"it is a {family!r} node"
        if not registry.same_kernel(family, info["params"], params):
            keys = sorted(k for k in {*params, *info["params"]}
                          if params.get(k) != info["params"].get(k))
            return f"{', '.join(map(str, keys))[:200]} differ"
    except Exception as e:  # whatever a forged node makes the checker raise
        return f"the node is malformed: {type(e).__name__}"
    return None


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
