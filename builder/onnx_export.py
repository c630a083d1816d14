"""Emit the engine's CPU graph: the whole step as one ONNX model run by onnxruntime.

Why one graph: on a few CPU cores the reference executor spends most of a decode step in
per-op Python dispatch, and onnxruntime sessions split at every attention op would wake
their thread pool once per segment. One session per step, with attention expressed in
standard ONNX ops over the paged cache, runs the whole step natively (the route
onnxruntime-genai takes, but on our paged cache and flat in-flight batches).

The model's contract with `runtime.onnx_backend`:

* inputs: the plan's own inputs that ops other than attention read (input_ids,
  position_ids, logits_indices), plus the per-step attention metadata the runtime builds
  once for all layers: `attn.q_index` [B, Tq] (flat token of each padded query row),
  `attn.ctx_slots` [B, C] (cache slot of each earlier context position), `attn.mask`
  (and `attn.mask.w<W>` per sliding window W) [B, 1, Tq, C + Tq] additive, in graphs of
  ALiBi models `attn.rel_pos` [B, 1, Tq, C + Tq] (each key's position minus the query's),
  `attn.out_index` [T] (padded row of each flat token), and each layer's cache halves
  `kv_cache.<layer>.k` / `.v` [S, kv_heads·head_dim] (S slots; views of the paged cache
  bound by address, read only).
* outputs: the plan's output (logits) and `kv_new` [L, 2, T, kv_heads, head_dim], the
  step's keys (after RoPE) and values in the cache's dtype, which the runtime writes into
  the paged cache.

Weights are not copied: initializers are external data pointing into the engine's
safetensors file (offset and length of each tensor), so the engine gains a few hundred KB.
How each weight format's GEMM maps onto onnxruntime's kernels (`MatMulNBits`,
`DynamicQuantizeMatMul`, conversions folded at load) is told in onnx_gemm.

This module is the entry point (`export_onnx`) and the whole-graph assembly (`_Emitter.build`:
the plan's nodes in order, then the outputs and the attention inputs). The emitter is
composed from one file per idea:

* `onnx_emitter`: its state and graph-building helpers (`op`, `const`, casts, weights);
* `onnx_ops`: the simple ops (views, casts, embeddings, norms, activations, pointwise);
* `onnx_gemm`: `linear`, one lowering per weight format (`LINEAR`), and `matmul`;
* `onnx_attention`: paged attention over the runtime's cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from llm_engine.builder.onnx_attention import REL_POS, PagedAttention, cache_input
from llm_engine.builder.onnx_emitter import DTYPES, OPSET, Unsupported
from llm_engine.builder.onnx_export_report import OnnxExport
from llm_engine.builder.onnx_gemm import GemmLowerings
from llm_engine.builder.onnx_moe import MoeOps
from llm_engine.builder.onnx_ops import SimpleOps
from llm_engine.runtime.onnx_backend import KV_OUTPUT

__all__ = ["OPSET", "Unsupported", "export_onnx"]


class _Emitter(SimpleOps, GemmLowerings, PagedAttention, MoeOps):
    """One export: the state of `EmitterCore`, every op's lowering, and the graph around them."""

    def build(self) -> onnx.ModelProto:
        layers = self.kv_layers
        if not layers:
            raise Unsupported("the plan has no attention layers")
        first = layers[0]
        if any((lay["num_kv_heads"], lay["head_dim"], lay["dtype"]) !=
               (first["num_kv_heads"], first["head_dim"], first["dtype"]) for lay in layers):
            raise Unsupported("attention layers differ in KV heads, head size or cache dtype")
        kvh, d = first["num_kv_heads"], first["head_dim"]
        for n in self.plan["nodes"]:
            self.emit(n)
        outputs = self.plan["outputs"]
        if len(outputs) != 1:
            raise Unsupported(f"{len(outputs)} plan outputs")
        logits = self.values[outputs[0]]
        if self.nodes_by_name[outputs[0]]["dtype"] != "float32":
            logits = self.op("Cast", logits, to=TensorProto.FLOAT)
        self.onnx_nodes.append(helper.make_node("Identity", [logits], ["logits"]))
        kv = self.op("Concat", *self.kv_outputs, axis=0)  # [2L, T, kvh*d]
        self.onnx_nodes.append(helper.make_node("Reshape", [kv, self.const(
            [len(layers), 2, -1, kvh, d])], [KV_OUTPUT]))
        cache_elem = DTYPES[first["dtype"]]
        self.add_input("attn.q_index", TensorProto.INT64, ["B", "Tq"])
        self.add_input("attn.ctx_slots", TensorProto.INT64, ["B", "C"])
        self.add_input("attn.out_index", TensorProto.INT64, ["T"])
        for layer in range(len(layers)):
            for half in ("k", "v"):
                self.add_input(cache_input(layer, half), cache_elem, ["S", kvh * d])
        masks = ["attn.mask"] + [f"attn.mask.w{w}" for w in sorted(self.windows)]
        if any(n["op"] == "paged_attention" and n["attrs"].get("alibi")
               for n in self.plan["nodes"]):
            masks.append(REL_POS)
        for name in masks:
            self.add_input(name, TensorProto.FLOAT, ["B", 1, "Tq", "CTq"])
        graph = helper.make_graph(
            _live(self.onnx_nodes, ["logits", KV_OUTPUT]), "llm_engine_step",
            self.graph_inputs,
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
             helper.make_tensor_value_info(KV_OUTPUT, cache_elem, None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        return model


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in order: plan ops a shortcut bypassed (the
    [1, heads, T, d] views of q/k/v) are dropped rather than left to the session."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]


def export_onnx(plan: dict[str, Any], weights_file: Path, target: Path) -> OnnxExport:
    """Write `target` (next to `weights_file`) or say why the plan cannot be expressed."""
    emitter = _Emitter(plan, weights_file)
    try:
        model = emitter.build()
    except Unsupported as e:
        return OnnxExport(False, str(e))
    target.write_bytes(model.SerializeToString())
    return OnnxExport(True, nodes=len(model.graph.node), lowerings=dict(emitter.lowerings))
