"""ONNX lowerings of the mixture-of-experts ops (kernels/moe.py): the experts and the
router's top-k, gather, scatter, masked_fill, compare and logical_not.

`moe` has three lowerings. Where onnxruntime's `com.microsoft.MoE` computes the gate
(SwiGLU: silu, and gpt-oss's clamped form) it runs only the routed experts (`moe_contrib`);
quantized experts (int8 per channel, int4 groups) go to its `QMoE` the same way
(`moe_quantized`), reading the stored codes directly.
Otherwise every expert runs on every token as one batched MatMul, and the outputs are
summed with the router's weights scattered into a [T, E] matrix that is zero where a token
was not routed (`moe_dense`): the reference's sum, reordered, at E / k times the experts'
FLOPs. benchmarks/ops/moe.py measures both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from llm_engine.builder.onnx_emitter import FLOATS, EmitterCore
from llm_engine.kernels import formats


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

    # Which lowering `moe` gets: onnxruntime's MoE / QMoE contrib ops where they compute the
    # gate (SwiGLU: silu and gpt-oss's clamped form), else the dense one.
    # benchmarks/ops/moe.py measures them.
    MOE_LOWERING = "auto"  # auto | dense | gather (benchmark only)

    def op_moe(self, n, ins, attrs):
        ex = _Experts.of(self, n, ins, attrs)
        if self.MOE_LOWERING == "gather":
            return self.counted("moe_gather", self.moe_gather(ex, attrs))
        swiglu = self.MOE_LOWERING == "auto" and attrs["act"] in ("silu", "clamped_swiglu")
        if ex.fmt != "dense" and swiglu:
            return self.counted("moe_qmoe", self.moe_quantized(ex, attrs))
        if swiglu:
            return self.counted("moe_contrib", self.moe_contrib(ex, attrs))
        return self.counted("moe_dense", self.moe_dense(ex, attrs))

    def counted(self, lowering: str, out: str) -> str:
        self.lowerings[lowering] = self.lowerings.get(lowering, 0) + 1
        return out

    def swiglu_attrs(self, ex: _Experts, attrs) -> dict:
        clamped = attrs["act"] == "clamped_swiglu"
        extra = {"swiglu_limit": float(attrs["limit"])} if clamped else {}
        return dict(domain="com.microsoft", k=ex.top_k, activation_type="swiglu",
                    swiglu_fusion=1, normalize_routing_weights=0,
                    activation_alpha=float(attrs["alpha"]) if clamped else 1.0,
                    activation_beta=1.0 if clamped else 0.0, **extra)

    def moe_contrib(self, ex: _Experts, attrs):
        """com.microsoft.MoE: only the routed experts run. Its CPU kernel routes by itself
        (softmax over [T, E] router logits, then top-k), so the graph's own choice goes in as
        logits: log(weight) at the chosen experts, -1e30 elsewhere; softmax gives each
        chosen weight over their sum, and the output is scaled back by that sum (routers that
        do not renormalize, DeepSeek's scaling factor). The gate/up rows come interleaved, as
        the kernel reads them."""
        logits = self.routed(ex.rows, ex.index, self.op(
            "Log", self.op("Max", ex.weights, self.const(1e-30, np.float32))), ex.experts, -1e30)
        fc1, fc2 = ex.float_weights(self)
        y = self.op("MoE", ex.rows, logits, fc1, ex.biases[0], fc2, ex.biases[1],
                    **self.swiglu_attrs(ex, attrs))
        total = self.op("ReduceSum", ex.weights, self.const([-1]), keepdims=1)  # [T, 1]
        return self.op("Reshape", self.op("Mul", y, total), ex.out_shape)

    def moe_quantized(self, ex: _Experts, attrs):
        """com.microsoft.QMoE over the stored int8 / int4 experts. Its `router_weights`
        input takes the graph's routing weights as they are; `router_probs` only selects,
        so it is 1 at each token's chosen experts and 0 elsewhere. int8 codes go in offset
        to uint8 (zero point 128), int4 zero points two to a byte: conversions stated on
        the initializers, which onnxruntime folds at load."""
        probs = self.routed(ex.rows, ex.index, self.op(
            "Expand", self.const([1.0], np.float32), self.op("Shape", ex.index)), ex.experts, 0.0)
        weights = self.routed(ex.rows, ex.index, ex.weights, ex.experts, 0.0)
        (w1, s1, *z1), (w2, s2, *z2) = ex.parts
        if ex.fmt == "int8_channel":
            w1, w2, z1, z2 = self.offset_u8(w1), self.offset_u8(w2), "", ""
            bits = {"expert_weight_bits": 8}
        else:
            z1, z2 = (self.pack_nibbles(z[0], [e, n, packed * 2 // ex.group])
                      for z, (e, n, packed) in zip((z1, z2), ex.shapes, strict=True))
            bits = {"expert_weight_bits": 4, "block_size": ex.group}
        y = self.op("QMoE", ex.rows, probs, w1, s1, ex.biases[0], w2, s2, ex.biases[1], "", "",
                    "", z1, z2, "", weights, **self.swiglu_attrs(ex, attrs), **bits)
        return self.op("Reshape", y, ex.out_shape)

    def offset_u8(self, q: str) -> str:
        """Symmetric int8 codes as uint8 with zero point 128."""
        return self.op("Cast", self.op("Add", self.op("Cast", q, to=TensorProto.INT32),
                                       self.const(128, np.int32)), to=TensorProto.UINT8)

    def pack_nibbles(self, zeros: str, shape: list[int]) -> str:
        """uint8 [E, N, B] in 0..15 -> [E, N, ceil(B / 2)], element 2j in the low nibble."""
        e, n, blocks = shape
        if blocks % 2:
            zeros = self.op("Pad", zeros, self.const([0, 0, 0, 0, 0, 1]))
            blocks += 1
        z = self.op("Cast", self.op("Reshape", zeros, self.const([e, n, blocks // 2, 2])),
                    to=TensorProto.INT32)
        lo = self.op("Gather", z, self.const(0), axis=3)
        hi = self.op("Mul", self.op("Gather", z, self.const(1), axis=3), self.const(16, np.int32))
        return self.op("Cast", self.op("Add", lo, hi), to=TensorProto.UINT8)

    def dequantize_experts(self, fmt: str, parts: list[str], shape: list[int], group: int
                           ) -> str:
        """Stored expert parts -> float [E, N, K] (constant: folded by onnxruntime at load)."""
        if fmt == "int8_channel":
            return self.op("Mul", self.op("Cast", parts[0], to=TensorProto.FLOAT),
                           self.op("Unsqueeze", parts[1], self.const([-1])))
        e, rows, half = shape
        lo = self.op("BitwiseAnd", parts[0], self.const(15, np.uint8))
        hi = self.op("BitShift", parts[0], self.const(4, np.uint8), direction="RIGHT")
        q = self.op("Concat", self.op("Unsqueeze", lo, self.const([-1])),
                    self.op("Unsqueeze", hi, self.const([-1])), axis=-1)
        q = self.op("Cast", self.op("Reshape", q, self.const([e, rows, 2 * half // group, group])),
                    to=TensorProto.FLOAT)
        z = self.op("Cast", self.op("Unsqueeze", parts[2], self.const([-1])), to=TensorProto.FLOAT)
        w = self.op("Mul", self.op("Sub", q, z), self.op("Unsqueeze", parts[1], self.const([-1])))
        return self.op("Reshape", w, self.const([e, rows, 2 * half]))

    def moe_gather(self, ex: _Experts, attrs):
        """Per expert: gather the rows routed to it (NonZero), its two GEMMs, and a scatter-add
        of the weighted result: the reference's loop as ~15 nodes per expert. Only the
        routed rows are computed, at the cost of E chains of small nodes; benchmarks/ops/moe.py
        measures it against the contrib op and the dense form (no build picks it)."""
        fc1, fc2 = ex.float_weights(self)
        out = self.op("Mul", ex.rows, self.const(0.0, np.float32))
        for e in range(ex.experts):
            chosen = self.op("Equal", ex.index, self.const(e, np.int64))  # [T, k]
            weight = self.op("ReduceSum", self.op("Where", chosen, ex.weights,
                                                  self.const(0.0, np.float32)),
                             self.const([-1]), keepdims=0)  # [T]
            tokens = self.op("Reshape", self.op("NonZero", self.op(
                "Cast", self.op("ReduceMax", self.op("Cast", chosen, to=TensorProto.INT32),
                                self.const([-1]), keepdims=0), to=TensorProto.BOOL)),
                self.const([-1]))  # [n]
            rows = self.op("Gather", ex.rows, tokens, axis=0)  # [n, H]
            w_e = [self.op("Gather", fc, self.const(e, np.int64), axis=0) for fc in (fc1, fc2)]
            h = self.op("MatMul", rows, self.op("Transpose", w_e[0], perm=[1, 0]))
            if ex.biases[0]:
                h = self.op("Add", h, self.op("Gather", ex.biases[0], self.const(e, np.int64),
                                              axis=0))
            y = self.op("MatMul", self.moe_gate(h, attrs),
                        self.op("Transpose", w_e[1], perm=[1, 0]))
            if ex.biases[1]:
                y = self.op("Add", y, self.op("Gather", ex.biases[1], self.const(e, np.int64),
                                              axis=0))
            y = self.op("Mul", y, self.op("Unsqueeze", self.op("Gather", weight, tokens, axis=0),
                                          self.const([-1])))
            out = self.op("ScatterND", out, self.op("Unsqueeze", tokens, self.const([-1])), y,
                          reduction="add")
        return self.op("Reshape", out, ex.out_shape)

    def moe_dense(self, ex: _Experts, attrs):
        # [T, E]: each token's weight for each expert, zero where it was not routed
        route = self.routed(ex.rows, ex.index, ex.weights, ex.experts, 0.0)
        fc1, fc2 = ex.float_weights(self)
        # Transposed on every call: onnxruntime does not fold this for large initializers
        w_gu = self.op("Transpose", fc1, perm=[0, 2, 1])  # [E, H, 2I]
        w_down = self.op("Transpose", fc2, perm=[0, 2, 1])  # [E, I, H]
        h = self.op("MatMul", ex.rows, w_gu)  # [E, T, 2I]
        if ex.biases[0]:
            h = self.op("Add", h, self.op("Unsqueeze", ex.biases[0], self.const([1])))
        y = self.op("MatMul", self.moe_gate(h, attrs), w_down)
        if ex.biases[1]:
            y = self.op("Add", y, self.op("Unsqueeze", ex.biases[1], self.const([1])))
        scale = self.op("Unsqueeze", self.op("Transpose", route, perm=[1, 0]),
                        self.const([2]))  # [E, T, 1]
        out = self.op("ReduceSum", self.op("Mul", y, scale), self.const([0]), keepdims=0)
        return self.op("Reshape", out, ex.out_shape)

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


@dataclass
class _Experts:
    """A `moe` node's operands as the lowerings use them: token rows [T, H] and routing in
    fp32, each GEMM's stored parts (one dense tensor, or a format's parts) with the shape of
    the first, and the biases ("" for none)."""

    rows: str
    index: str
    weights: str
    parts: tuple[list[str], list[str]]
    shapes: tuple[list[int], list[int]]
    biases: tuple[str, str]
    fmt: str
    group: int
    top_k: int
    out_shape: str

    @property
    def experts(self) -> int:
        return self.shapes[0][0]

    @classmethod
    def of(cls, em: MoeOps, n, ins, attrs) -> _Experts:
        names = n["inputs"]
        dtype = [em.nodes_by_name[name]["dtype"] for name in names]
        fmt = attrs.get("w_format", "dense")
        per = formats.get(fmt).operands
        hidden = em.nodes_by_name[names[0]]["shape"][-1]
        rows = em.op("Reshape", em.as_float(ins[0], dtype[0]), em.const([-1, hidden]))
        parts = (list(ins[3:3 + per]), list(ins[3 + per:3 + 2 * per]))
        if fmt == "dense":
            parts = ([em.as_float(parts[0][0], dtype[3])], [em.as_float(parts[1][0], dtype[4])])
        shapes = (list(em.nodes_by_name[names[3]]["shape"]),
                  list(em.nodes_by_name[names[3 + per]]["shape"]))
        biases = tuple(em.as_float(b, d) for b, d in zip(ins[3 + 2 * per:], dtype[3 + 2 * per:]))
        return cls(rows, ins[1], em.as_float(ins[2], dtype[2]), parts, shapes,
                   biases if biases else ("", ""), fmt, attrs.get("group_size") or 0,
                   int(em.nodes_by_name[names[1]]["shape"][-1]), em.op("Shape", ins[0]))

    def float_weights(self, em: MoeOps) -> tuple[str, str]:
        """gate_up [E, 2I, H] and down [E, H, I] in fp32."""
        if self.fmt == "dense":
            return self.parts[0][0], self.parts[1][0]
        return tuple(em.dequantize_experts(self.fmt, p, s, self.group)
                     for p, s in zip(self.parts, self.shapes, strict=True))
