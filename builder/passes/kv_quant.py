"""kv_quant: store the paged KV cache in int8 or fp8 (e4m3fn) with static per-KV-head scales.

`quantize_kv_cache(graph, kv_dtype, scales)` runs on a graph after the kv_cache pass (before
or after fuse/quantize/plan_memory/codegen) and before `to_plan`. The scales come from
calibration: `scales[layer] = (k_scale, v_scale)`, one positive float per KV head of that
layer, K's measured after rotary embedding. The contract with the runtime is the
`paged_attention` node attrs, which travel to the plan as JSON:

- `kv_dtype`: "int8" or "float8_e4m3fn"
- `k_scale`, `v_scale`: lists of `num_kv_heads` floats

and `graph.meta["kv_cache"]["layers"][i]["dtype"] = kv_dtype`, from which the runtime
allocates the cache (1 byte per element: the same memory holds 2x the blocks of a bf16
cache, 4x those of fp32). A cache value x of KV head h is stored as
clamp(round(x / scale[h]), -127, 127) (int8) or clamp(x / scale[h], -448, 448) in e4m3fn,
and read back as code * scale[h] (`kernels.attention`), so absmax / 127 (resp. / 448) of
calibration activations is the natural scale.

The weights are untouched: any weight format (float, int8, int4, fp8) works with a
quantized cache. When codegen has already run, the attention kernels are re-chosen and
re-rendered for the new cache dtype (other kernels are left as they are).
"""

from __future__ import annotations

import json
import math
from typing import Any

from builder.codegen import _kv_dtype, _listed, _render_cached, _shapes, _templates_key
from builder.errors import BuildError
from builder.ir import Graph
from kernels.codegen import kernel_name
from kernels.triton import registry

KV_DTYPES = ("int8", "float8_e4m3fn")
ALIASES = {"fp8": "float8_e4m3fn", "float8": "float8_e4m3fn"}

Scales = dict[int, tuple[list[float], list[float]]]


def quantize_kv_cache(graph: Graph, kv_dtype: str, scales: Scales) -> int:
    """Mark every paged_attention node's cache as `kv_dtype` with its layer's scales; returns
    the number of nodes changed. Raises BuildError (one line) on bad arguments."""
    kv_dtype = ALIASES.get(kv_dtype, kv_dtype)
    if kv_dtype not in KV_DTYPES:
        raise BuildError(f"KV cache dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    nodes = [n for n in graph.nodes() if n.op == "paged_attention"]
    layers = (graph.meta.get("kv_cache") or {}).get("layers") or []
    if not nodes or not layers:
        raise BuildError("quantize_kv_cache: the graph has no paged attention (run the "
                         "kv_cache pass first)")
    known = {n.attrs["layer"] for n in nodes}
    extra = sorted(set(scales) - known, key=str)
    if extra:
        raise BuildError(f"KV cache scales given for layer(s) {extra} but the model has "
                         f"attention layers {_span(known)}")
    checked: dict[int, tuple[list[float], list[float]]] = {}
    for node in nodes:
        layer = node.attrs["layer"]
        if layer not in checked:
            if not isinstance(layer, int) or not 0 <= layer < len(layers):
                raise BuildError(f"{node.name}: layer {layer!r} has no kv_cache entry")
            checked[layer] = _check_layer(layer, scales, node.attrs["num_kv_heads"])
    for node in nodes:
        k_scale, v_scale = checked[node.attrs["layer"]]
        node.attrs.update({"kv_dtype": kv_dtype, "k_scale": list(k_scale),
                           "v_scale": list(v_scale)})
    for layer in checked:
        layers[layer]["dtype"] = kv_dtype
    if graph.meta.get("codegen"):
        _recodegen_attention(graph)
    return len(nodes)


def _span(layers) -> str:
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)


def _check_layer(layer: int, scales: Scales, kv_heads: int
                 ) -> tuple[list[float], list[float]]:
    if layer not in scales:
        raise BuildError(f"KV cache scales: none given for attention layer {layer}; "
                         "calibration must cover every layer")
    entry = scales[layer]
    if isinstance(entry, tuple | list) and len(entry) == 2:
        entry = [x.tolist() if hasattr(x, "tolist") else x for x in entry]  # tensors, arrays
    if not (isinstance(entry, list) and len(entry) == 2
            and all(isinstance(x, list | tuple) for x in entry)):
        raise BuildError(f"KV cache scales of layer {layer}: expected (k_scale, v_scale), two "
                         f"lists of {kv_heads} floats, got {entry!r:.60}")
    out = []
    for name, values in zip(("k_scale", "v_scale"), entry):
        try:
            values = [float(x) for x in values]
        except (TypeError, ValueError):
            raise BuildError(f"KV cache {name} of layer {layer} is not a list of numbers") \
                from None
        if len(values) != kv_heads:
            raise BuildError(f"KV cache {name} of layer {layer} has {len(values)} values; the "
                             f"layer has {kv_heads} KV heads (one scale per KV head)")
        for h, x in enumerate(values):
            if not 0.0 < x < math.inf:
                raise BuildError(f"KV cache {name} of layer {layer}, KV head {h}: {x!r} is "
                                 "not a positive finite scale")
        out.append(values)
    return out[0], out[1]


def _recodegen_attention(graph: Graph) -> None:
    """Re-choose and re-render the kernels of the paged_attention nodes after their cache
    dtype changed; nodes no template accepts fall back to the reference op."""
    meta = graph.meta["codegen"]
    attention = [n for n in graph.nodes() if n.op == "paged_attention"]
    names = {n.name for n in attention}
    stale = {k for n, ks in meta["node_kernels"].items() if n in names for k in ks}
    node_kernels = {n: ks for n, ks in meta["node_kernels"].items() if n not in names}
    still_used = {k for ks in node_kernels.values() for k in ks}
    kernels = {k: v for k, v in meta["kernels"].items() if k not in stale or k in still_used}
    sources = {k: v for k, v in meta["sources"].items() if k in kernels}
    groups: dict[str, dict[str, Any]] = {}
    for node in attention:
        shapes, dtypes = _shapes(graph, node)
        choice = registry.choose(node.op, node.attrs, shapes, dtypes, node.dtype,
                                 kv_cache_dtype=_kv_dtype(graph, node))
        if choice is None:
            continue
        family, params = choice
        key = json.dumps([family, params], sort_keys=True)
        groups.setdefault(key, {"family": family, "params": params, "nodes": []})
        groups[key]["nodes"].append(node.name)
    templates_key = _templates_key()
    for group in groups.values():
        listed = _listed(group["nodes"])
        rendered, _ = _render_cached(group["family"], group["params"], listed, templates_key)
        group_names = []
        for template, source in rendered.items():
            name = kernel_name(source)
            sources[name] = source
            kernels[name] = {"family": group["family"], "template": template,
                             "params": group["params"], "nodes": listed}
            group_names.append(name)
        for n in group["nodes"]:
            node_kernels[n] = group_names
    meta.update({"kernels": kernels, "node_kernels": node_kernels, "sources": sources})
