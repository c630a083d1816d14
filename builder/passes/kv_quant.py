"""kv_quant: store the paged KV cache in int8 or fp8 (e4m3fn) with static per-KV-head scales.

`quantize_kv_cache(graph, kv_dtype, scales)` runs on a graph after the kv_cache pass and
before codegen (the quantize pass calls it), so codegen picks the attention kernels for the
cache dtype. The scales come from
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
quantized cache.
"""

from __future__ import annotations

import math

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph

KV_DTYPES = ("int8", "float8_e4m3fn")
ALIASES = {"fp8": "float8_e4m3fn", "float8": "float8_e4m3fn"}

Scales = dict[int, tuple[list[float], list[float]]]


def quantize_kv_cache(graph: Graph, kv_dtype: str, scales: Scales) -> int:
    """Mark every paged_attention node's cache as `kv_dtype` with its layer's scales; returns
    the number of nodes changed. Raises BuildError (one line) on bad arguments."""
    kv_dtype = ALIASES.get(kv_dtype, kv_dtype)
    if kv_dtype not in KV_DTYPES:
        raise BuildError(f"KV cache dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    if graph.meta.get("codegen"):
        raise BuildError("quantize_kv_cache must run before codegen: the attention kernels "
                         "are chosen for the cache dtype")
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
