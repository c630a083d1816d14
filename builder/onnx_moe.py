"""ONNX lowerings of the mixture-of-experts ops (kernels/moe.py): the experts and the
router's top-k, gather, scatter, masked_fill, compare and logical_not.

`moe` has two lowerings. Where onnxruntime's `com.microsoft.MoE` computes the gate (SwiGLU:
silu, and gpt-oss's clamped form) it runs only the routed experts (`moe_contrib`).
Otherwise every expert runs on every token as one batched MatMul, and the outputs are
summed with the router's weights scattered into a [T, E] matrix that is zero where a token
was not routed (`moe_dense`): the reference's sum, reordered, at E / k times the experts'
FLOPs. benchmarks/ops/moe.py measures both.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from llm_engine.builder.onnx_emitter import FLOATS, EmitterCore


class MoeOps(EmitterCore):
    def op_topk(self, n, ins, attrs):
        _, idx = self.node("TopK", [ins[0], self.const([attrs["k"]])], 2, axis=attrs["dim"],
                           largest=int(attrs.get("largest", True)), sorted=1)
        return idx

    def op_gather(self, n, ins, attrs):
        return self.op("GatherElements", ins[0], ins[1], axis=attrs["dim"])

    def scalar(self, value: float, dtype: str, shape: list[int] | None = None) -> str:
        """A constant `value` in the graph's element type for `dtype` (floats are fp32)."""
        const = self.const(value if shape is None else np.full(shape, value), np.float32)
        return const if dtype == "float32" else self.cast_to(const, dtype)

    def op_scatter(self, n, ins, attrs):
        updates = self.op("Expand", self.scalar(attrs["value"], n["dtype"], [1]),
                          self.op("Shape", ins[1]))
        return self.op("ScatterElements", ins[0], ins[1], updates, axis=attrs["dim"])

    def op_masked_fill(self, n, ins, attrs):
        return self.op("Where", ins[1], self.scalar(attrs["value"], n["dtype"]), ins[0])

    def op_compare(self, n, ins, attrs):
        op = {"gt": "Greater", "ge": "GreaterOrEqual", "lt": "Less", "le": "LessOrEqual",
              "eq": "Equal", "ne": "Equal"}[attrs["op"]]
        a_dtype = self.nodes_by_name[n["inputs"][0]]["dtype"]
        b = ins[1] if len(ins) > 1 else self.scalar(
            attrs["scalar"], "float32" if a_dtype in FLOATS else a_dtype)
        out = self.op(op, ins[0], b)
        return self.op("Not", out) if attrs["op"] == "ne" else out

    def op_logical_not(self, n, ins, attrs):
        return self.op("Not", ins[0])

    def routed(self, rows: str, index: str, values: str, experts: int, fill: float) -> str:
        """[T, E]: `values` at each token's chosen experts (`index` [T, k]), `fill`
        elsewhere."""
        t_e = self.op("Concat", self.op("Slice", self.op("Shape", rows), self.const([0]),
                                        self.const([1])), self.const([experts]), axis=0)
        base = self.op("ConstantOfShape", t_e,
                       value=helper.make_tensor("value", TensorProto.FLOAT, [1], [fill]))
        return self.op("ScatterElements", base, index, values, axis=1)

    # Which lowering `moe` gets: onnxruntime's MoE contrib op where it computes the gate
    # (SwiGLU: silu and gpt-oss's clamped form), else the dense one. benchmarks/ops/moe.py
    # measures both.
    MOE_LOWERING = "auto"  # auto | dense

    def op_moe(self, n, ins, attrs):
        if self.MOE_LOWERING == "auto" and attrs["act"] in ("silu", "clamped_swiglu"):
            self.lowerings["moe_contrib"] = self.lowerings.get("moe_contrib", 0) + 1
            return self.moe_contrib(n, ins, attrs)
        self.lowerings["moe_dense"] = self.lowerings.get("moe_dense", 0) + 1
        return self.moe_dense(n, ins, attrs)

    def moe_contrib(self, n, ins, attrs):
        """com.microsoft.MoE: only the routed experts run. Its CPU kernel routes by itself
        (softmax over [T, E] router logits, then top-k), so the graph's own choice goes in as
        logits: log(weight) at the chosen experts, -1e30 elsewhere; softmax gives each
        chosen weight over their sum, and the output is scaled back by that sum (routers that
        do not renormalize, DeepSeek's scaling factor). The gate/up rows come interleaved, as
        the kernel reads them."""
        x, index, weights, gate_up, down = ins[:5]
        names = n["inputs"]
        dtype = {name: self.nodes_by_name[name]["dtype"] for name in names}
        experts, _, hidden = self.nodes_by_name[names[3]]["shape"]
        rows = self.op("Reshape", self.as_float(x, dtype[names[0]]), self.const([-1, hidden]))
        w = self.as_float(weights, dtype[names[2]])
        logits = self.routed(rows, index, self.op(
            "Log", self.op("Max", w, self.const(1e-30, np.float32))), experts, -1e30)

        fc1 = self.as_float(gate_up, dtype[names[3]])  # interleaved, as the kernel wants
        fc2 = self.as_float(down, dtype[names[4]])
        fc1_bias = fc2_bias = ""
        if len(ins) > 5:
            fc1_bias = self.as_float(ins[5], dtype[names[5]])
            fc2_bias = self.as_float(ins[6], dtype[names[6]])
        clamped = attrs["act"] == "clamped_swiglu"
        extra = {"swiglu_limit": float(attrs["limit"])} if clamped else {}
        y = self.op("MoE", rows, logits, fc1, fc1_bias, fc2, fc2_bias, domain="com.microsoft",
                    k=int(self.nodes_by_name[names[1]]["shape"][-1]), activation_type="swiglu",
                    swiglu_fusion=1, normalize_routing_weights=0,
                    activation_alpha=float(attrs["alpha"]) if clamped else 1.0,
                    activation_beta=1.0 if clamped else 0.0, **extra)
        total = self.op("ReduceSum", w, self.const([-1]), keepdims=1)  # [T, 1]
        return self.op("Reshape", self.op("Mul", y, total), self.op("Shape", ins[0]))

    def moe_dense(self, n, ins, attrs):
        x, index, weights, gate_up, down = ins[:5]
        dtype = {name: self.nodes_by_name[name]["dtype"] for name in n["inputs"]}
        biases = [self.as_float(b, dtype[name]) for b, name in zip(ins[5:], n["inputs"][5:])]
        gu_node = self.nodes_by_name[n["inputs"][3]]
        experts, hidden = gu_node["shape"][0], gu_node["shape"][2]
        rows = self.op("Reshape", self.as_float(x, dtype[n["inputs"][0]]),
                       self.const([-1, hidden]))  # [T, H]
        # [T, E]: each token's weight for each expert, zero where it was not routed
        route = self.routed(rows, index, self.as_float(weights, dtype[n["inputs"][2]]),
                            experts, 0.0)
        # Transposed on every call: onnxruntime does not fold this for large initializers
        w_gu = self.op("Transpose", self.as_float(gate_up, dtype[n["inputs"][3]]),
                       perm=[0, 2, 1])  # [E, H, 2I]
        w_down = self.op("Transpose", self.as_float(down, dtype[n["inputs"][4]]),
                         perm=[0, 2, 1])  # [E, I, H]
        h = self.op("MatMul", rows, w_gu)  # [E, T, 2I]
        if biases:
            h = self.op("Add", h, self.op("Unsqueeze", biases[0], self.const([1])))
        y = self.op("MatMul", self.moe_gate(h, attrs), w_down)
        if biases:
            y = self.op("Add", y, self.op("Unsqueeze", biases[1], self.const([1])))
        scale = self.op("Unsqueeze", self.op("Transpose", route, perm=[1, 0]),
                        self.const([2]))  # [E, T, 1]
        out = self.op("ReduceSum", self.op("Mul", y, scale), self.const([0]), keepdims=0)
        return self.op("Reshape", out, self.op("Shape", ins[0]))

    def moe_gate(self, h: str, attrs) -> str:
        gate, up = (self.op("Slice", h, self.const([start]), self.const([2**62]),
                            self.const([-1]), self.const([2])) for start in (0, 1))
        if attrs["act"] != "clamped_swiglu":
            return self.op("Mul", self.act(gate, attrs["act"]), up)
        limit = self.const(float(attrs["limit"]), np.float32)
        g = self.op("Min", gate, limit)
        up = self.op("Clip", up, self.const(-float(attrs["limit"]), np.float32), limit)
        glu = self.op("Mul", g, self.op("Sigmoid", self.op(
            "Mul", g, self.const(float(attrs["alpha"]), np.float32))))
        return self.op("Mul", self.op("Add", up, self.const(1.0, np.float32)), glu)
