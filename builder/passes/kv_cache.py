"""kv_cache: causal `sdpa` -> `paged_attention` over a paged KV cache.

Each attention node becomes one layer of the cache. Its K/V inputs are taken from before
HF's `repeat_kv` (unsqueeze/expand/reshape), so the cache stores only the KV heads and the
attention kernel shares each across its query-head group. The attention metadata of a flat
batch (slot mapping, block tables, context lengths, query starts) becomes graph inputs.
Positions already are one (`position_ids`), which covers RoPE and learned (GPT-2) positions.
"""

from __future__ import annotations

from llm_engine.builder.errors import BuildError
from llm_engine.builder.ir import Graph, Node
from llm_engine.builder.passes.report import PassReport

METADATA_INPUTS = {
    # name: (shape, dtype); -1 is a size only the runtime knows (sequences, blocks)
    "slot_mapping": (("T",), "int64"),
    "block_tables": ((-1, -1), "int32"),
    "context_lens": ((-1,), "int32"),
    "query_start_loc": ((-1,), "int32"),
}


def strip_repeat_kv(graph: Graph, name: str) -> str:
    """x [1, Hkv, T, D] if `name` is reshape(expand(unsqueeze(x, 2))) (HF's repeat_kv)."""
    node = graph.node(name)
    if node.op != "reshape":
        return name
    expand = graph.producer(node, 0)
    if expand.op != "expand":
        return name
    unsq = graph.producer(expand, 0)
    if unsq.op != "unsqueeze" or unsq.attrs["dim"] != 2:
        return name
    return unsq.inputs[0]


def _weight_values(graph: Graph, name: str, options) -> list[float]:
    """The values of a small weight (a layer's attention sinks), read from the checkpoint."""
    from llm_engine.builder.weights import make_weight

    node = graph.node(name)
    if node.op != "weight" or options is None or options.weights is None:
        raise ValueError(f"{name}: attention sinks must be a checkpoint weight")
    spec = graph.weights[node.attrs["name"]]
    return [float(x) for x in make_weight(spec, options.weights, options.buffers).float()
            .flatten()]


def _pad_values(graph: Graph, v: str, after: int, order: float) -> str:
    """v [1, Hkv, T, Dv] with zeros to the keys' head size."""
    node = graph.node(v)
    return graph.add("pad", [v], (*node.shape[:3], node.shape[3] + after), node.dtype,
                     attrs={"after": after}, origin=node.origin, name=f"{v}_padded",
                     order=order - 1e-4).name


def _metadata_inputs(graph: Graph) -> list[str]:
    names = []
    for name, (shape, dtype) in METADATA_INPUTS.items():
        if name not in graph:
            graph.add("input", [], shape, dtype, attrs={"name": name}, name=name, order=-1.0)
            graph.inputs.append(name)
        names.append(name)
    return names


def kv_cache(graph: Graph, options=None) -> tuple[Graph, PassReport]:
    attention: list[Node] = [n for n in graph.nodes() if n.op == "sdpa"]
    report = PassReport("kv_cache")
    if not attention:
        report.notes.append("no attention nodes found")
        return graph, report
    meta = _metadata_inputs(graph)
    layers = []
    for layer, node in enumerate(attention):
        q, k, v = node.inputs[:3]
        extra = {}
        if node.attrs.get("softcap"):
            extra["softcap"] = node.attrs["softcap"]
        if node.attrs.get("alibi"):  # per-head slopes (MPT)
            extra["alibi"] = node.attrs["alibi"]
        if len(node.inputs) > 3:  # sinks: their values become attrs, as KV scales are
            extra["sinks"] = _weight_values(graph, node.inputs[3], options)
        k, v = strip_repeat_kv(graph, k), strip_repeat_kv(graph, v)
        q_shape, k_shape = graph.node(q).shape, graph.node(k).shape
        heads, kv_heads, head_dim = q_shape[1], k_shape[1], k_shape[3]
        v_dim = graph.node(v).shape[3]
        if v_dim > head_dim:
            raise BuildError(f"{node.name}: values of head size {v_dim} over keys of "
                             f"{head_dim}: the paged cache holds one head size for both; "
                             "values larger than keys are not supported")
        if v_dim < head_dim:  # MLA: v_head_dim < qk_head_dim, padded as vLLM does for FA
            v = _pad_values(graph, v, head_dim - v_dim, node.order)
        if heads % kv_heads:
            raise ValueError(f"{node.name}: {heads} query heads over {kv_heads} KV heads")
        paged = graph.add(
            "paged_attention", [q, k, v, *meta], node.shape, node.dtype,
            attrs={"layer": layer, "scale": node.attrs["scale"], "window": node.attrs["window"],
                   "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
                   **extra},
            origin=node.origin, name=f"paged_attention_{layer}", order=node.order)
        out = paged.name
        if v_dim < head_dim:  # the padded value channels attend to zeros: drop them
            paged.shape = (*node.shape[:3], head_dim)
            out = graph.add("slice", [paged.name], node.shape, node.dtype,
                            attrs={"dim": 3, "start": 0, "end": v_dim}, origin=node.origin,
                            name=f"paged_attention_{layer}_values", order=node.order + 1e-4).name
        graph.replace_uses(node.name, out)
        graph.remove(node.name)
        layers.append({"num_kv_heads": kv_heads, "head_dim": head_dim,
                       "dtype": graph.node(k).dtype, "window": node.attrs["window"]})
    removed = graph.dce()
    graph.meta["kv_cache"] = {"layers": layers}
    report.changed = True
    report.stats = {"attention_layers": len(layers), "repeat_kv_removed": removed,
                    "kv_heads": layers[0]["num_kv_heads"], "head_dim": layers[0]["head_dim"]}
    return graph, report


def _row_wise(node: Node) -> bool:
    """An elementwise op of one tensor that treats each row alone: by a scalar or by
    nothing (tanh, a cast)."""
    if len(node.inputs) != 1:
        return False
    return node.op in ("tanh", "to_dtype") or (node.op in ("mul", "div", "add", "sub")
                                               and "scalar" in node.attrs)


def select_logits(graph: Graph, options=None) -> tuple[Graph, PassReport]:
    """Compute logits only for the rows in the `logits_indices` input (last token of each
    sequence, unless prompt logprobs are wanted): gathers the hidden states before lm_head."""
    report = PassReport("select_logits")
    # The head may be scaled after the GEMM (Granite's logits_scaling, Cohere's logit_scale,
    # soft-capping): row-wise ops by scalars, which commute with choosing rows.
    tail: list[Node] = []
    out = graph.node(graph.outputs[0])
    while _row_wise(out):
        tail.append(out)
        out = graph.producer(out, 0)
    if out.op != "linear" or len(out.shape) != 3:
        report.notes.append(f"output is {out.op}, not a linear head; all rows kept")
        return graph, report
    idx = graph.add("input", [], ("N",), "int64", attrs={"name": "logits_indices"},
                    name="logits_indices", order=-1.0)
    graph.inputs.append(idx.name)
    hidden = graph.node(out.inputs[0])
    rows = graph.add("index_select", [hidden.name, idx.name], (1, "N", hidden.shape[2]),
                     hidden.dtype, attrs={"dim": 1}, origin=out.origin,
                     name="select_logit_rows", order=out.order - 1e-4)
    graph.set_inputs(out, [rows.name, *out.inputs[1:]])
    for node in [out, *tail]:
        node.shape = (1, "N", node.shape[2])
    report.changed = True
    report.stats = {"vocab": out.shape[2]}
    return graph, report
