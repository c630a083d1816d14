"""The ONNX lowerings of the plan's simple ops: inputs and weights, views (reshape,
transpose, slice, gather...), casts, embeddings, norms, activations, RoPE in standard ops,
reductions, softmax and fused pointwise expressions.

Each is a one-to-a-few-node translation with no layout decisions of its own, so they share
one mixin over `EmitterCore`: `op_<name>(node, inputs, attrs)` for IR op `name`, plus
`lower_elementwise` for the bare unary/binary IR ops that have no handler of their own. Two
calls leave this file: `op_reshape` asks `attention_rows` (onnx_attention) whether the view
is attention's output already laid out as rows, and attention reuses `rope` from here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from onnx import TensorProto

from llm_engine.builder.onnx_emitter import (
    ATTN_INPUTS,
    DTYPES,
    FLOATS,
    EmitterCore,
    Unsupported,
)

_UNARY = {"neg": "Neg", "sqrt": "Sqrt", "exp": "Exp", "log": "Log", "tanh": "Tanh",
          "sigmoid": "Sigmoid", "relu": "Relu", "cos": "Cos", "sin": "Sin", "abs": "Abs",
          "reciprocal": "Reciprocal", "erf": "Erf", "floor": "Floor"}
def _raw_use(e: dict[str, Any], k: int) -> bool:
    """Whether input k feeds an op of the expression other than a to_dtype."""
    args = e.get("args", [])
    if e.get("op") != "to_dtype" and any(a.get("in") == k for a in args):
        return True
    return any(_raw_use(a, k) for a in args if "op" in a)


_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow",
           "maximum": "Max", "minimum": "Min"}


class SimpleOps(EmitterCore):
    ELEMENTWISE: ClassVar[frozenset[str]] = frozenset({*_UNARY, *_BINARY, "rsqrt", "silu",
                                                       "log1p"})

    def lower_elementwise(self, n, ins, attrs):
        return self.expr({"op": n["op"], "args": [{"in": i} for i in range(len(ins))],
                          **({"scalar": attrs["scalar"]} if "scalar" in attrs else {})}, ins)

    # ---- inputs and views ---------------------------------------------------------------
    def op_input(self, n, ins, attrs):
        if n["name"] in ATTN_INPUTS:
            return None
        # plan dims: a size, a symbol ("T") or -1 (any); ONNX: int, named dim or None
        dims = [None if s == -1 else s for s in n["shape"]]
        return self.add_input(n["name"], DTYPES[n["dtype"]], dims)

    def op_weight(self, n, ins, attrs):
        return self.weight(n)

    def op_reshape(self, n, ins, attrs):
        rows = self.attention_rows(n)
        if rows is not None:
            return rows
        return self.op("Reshape", ins[0], self.shape_tensor(attrs["shape"]))

    def op_expand(self, n, ins, attrs):
        shape = [1 if s == -1 else s for s in attrs["shape"]]
        return self.op("Expand", ins[0], self.shape_tensor(shape))

    def op_transpose(self, n, ins, attrs):
        rank = len(n["shape"])
        perm = list(range(rank))
        a, b = attrs["dim0"] % rank, attrs["dim1"] % rank
        perm[a], perm[b] = perm[b], perm[a]
        return self.op("Transpose", ins[0], perm=perm)

    def op_permute(self, n, ins, attrs):
        return self.op("Transpose", ins[0], perm=[d % len(n["shape"]) for d in attrs["dims"]])

    def op_unsqueeze(self, n, ins, attrs):
        return self.op("Unsqueeze", ins[0], self.const([attrs["dim"]]))

    def op_squeeze(self, n, ins, attrs):
        return self.op("Squeeze", ins[0], self.const([attrs["dim"]]))

    def op_slice(self, n, ins, attrs):
        end = attrs["end"]
        end = 2**62 if end is None else end
        if not isinstance(end, int) or not isinstance(attrs["start"], int):
            raise Unsupported(f"slice bounds {attrs}")
        return self.op("Slice", ins[0], self.const([attrs["start"]]), self.const([end]),
                       self.const([attrs["dim"]]), self.const([attrs.get("step", 1)]))

    def op_select(self, n, ins, attrs):
        return self.op("Gather", ins[0], self.const(attrs["index"]), axis=attrs["dim"])

    def op_getitem(self, n, ins, attrs):
        if not isinstance(ins[0], tuple) or not isinstance(attrs.get("index"), int):
            raise Unsupported(f"getitem {attrs}")
        return ins[0][attrs["index"]]

    def op_cat(self, n, ins, attrs):
        return self.op("Concat", *ins, axis=attrs["dim"])

    def op_pad(self, n, ins, attrs):
        rank = len(n["shape"])
        return self.op("Pad", ins[0], self.const([0] * (2 * rank - 1) + [attrs["after"]]))

    def op_index_select(self, n, ins, attrs):
        return self.op("Gather", ins[0], ins[1], axis=attrs["dim"])

    def op_to_dtype(self, n, ins, attrs):
        return self.cast_to(ins[0], attrs["dtype"])

    # ---- embeddings, norms, activations, RoPE -------------------------------------------
    def op_embedding(self, n, ins, attrs):
        if attrs.get("vocab_start") is not None:
            raise Unsupported("vocabulary-sharded embedding (tensor parallel)")
        fmt = attrs.get("b_format", "dense")
        table = self.nodes_by_name[n["inputs"][0]]
        if fmt == "dense":
            rows = self.op("Gather", ins[0], ins[1], axis=0)
            return self.as_float(rows, table["dtype"])
        if fmt == "int8_channel":
            q = self.op("Cast", self.op("Gather", ins[0], ins[1], axis=0), to=TensorProto.FLOAT)
            s = self.op("Unsqueeze", self.op("Gather", ins[2], ins[1], axis=0), self.const([-1]))
            return self.op("Mul", q, s)
        raise Unsupported(f"embedding format {fmt!r}")

    def rms(self, x, w, w_dtype, eps):
        return self.op("SimplifiedLayerNormalization", x, self.as_float(w, w_dtype), axis=-1,
                       epsilon=float(eps))

    def op_rms_norm(self, n, ins, attrs):
        return self.rms(ins[0], ins[1], self.nodes_by_name[n["inputs"][1]]["dtype"],
                        attrs["eps"])

    def op_add_rms_norm(self, n, ins, attrs):
        s = self.op("Add", ins[0], ins[1])
        return (self.rms(s, ins[2], self.nodes_by_name[n["inputs"][2]]["dtype"], attrs["eps"]),
                s)

    def layer_norm(self, n, x, ins, attrs, w_index):
        args = [x, self.as_float(ins[w_index], self.nodes_by_name[n["inputs"][w_index]]["dtype"])]
        if len(ins) > w_index + 1:
            args.append(self.as_float(ins[w_index + 1],
                                      self.nodes_by_name[n["inputs"][w_index + 1]]["dtype"]))
        return self.op("LayerNormalization", *args, axis=-1, epsilon=float(attrs["eps"]))

    def op_layer_norm(self, n, ins, attrs):
        return self.layer_norm(n, ins[0], ins, attrs, 1)

    def op_add_layer_norm(self, n, ins, attrs):
        s = self.op("Add", ins[0], ins[1])
        return self.layer_norm(n, s, ins, attrs, 2), s

    def act(self, x: str, act: str) -> str:
        if act == "silu":
            return self.op("Mul", x, self.op("Sigmoid", x))
        if act == "relu":
            return self.op("Relu", x)
        if act in ("gelu", "gelu_tanh"):
            return self.op("Gelu", x, approximate="tanh" if act == "gelu_tanh" else "none")
        raise Unsupported(f"activation {act!r}")

    def op_gated_act(self, n, ins, attrs):
        gate, up = self.node("Split", [ins[0]], 2, axis=-1, num_outputs=2)
        return self.op("Mul", self.act(gate, attrs["act"]), up)

    def op_gelu(self, n, ins, attrs):
        return self.act(ins[0], "gelu_tanh" if attrs.get("approximate") == "tanh" else "gelu")

    def op_rope(self, n, ins, attrs):
        return self.rope(ins[0], ins[1], ins[2], self.nodes_by_name[n["inputs"][0]]["shape"][-1])

    def rope(self, x, cos, sin, dim):
        if dim % 2:
            raise Unsupported(f"rotary embedding over an odd head size {dim}")
        lo, hi = self.node("Split", [x], 2, axis=-1, num_outputs=2)
        rotated = self.op("Concat", self.op("Neg", hi), lo, axis=-1)
        return self.op("Add", self.op("Mul", x, cos), self.op("Mul", rotated, sin))

    # ---- reductions and pointwise expressions -------------------------------------------
    def reduce(self, op, x, dims, keepdim):
        return self.op(op, x, self.const(list(dims)), keepdims=int(bool(keepdim)))

    def op_mean(self, n, ins, attrs):
        return self.reduce("ReduceMean", ins[0], attrs["dims"], attrs.get("keepdim"))

    def op_sum(self, n, ins, attrs):
        return self.reduce("ReduceSum", ins[0], attrs["dims"], attrs.get("keepdim"))

    def op_amax(self, n, ins, attrs):
        return self.reduce("ReduceMax", ins[0], attrs["dims"], attrs.get("keepdim"))

    def op_softmax(self, n, ins, attrs):
        return self.op("Softmax", ins[0], axis=attrs["dim"])

    def op_pointwise(self, n, ins, attrs):
        # The expression computes in fp32, as the reference's float math does; an integer
        # input used directly in arithmetic (Llama 4's token positions + 1) joins it as a
        # float, exact below 2^24. Under a to_dtype it is cast there already.
        expr = attrs["expr"]
        ins = [self.cast_to(i, "float32") if self.nodes_by_name[name]["dtype"] not in FLOATS
               and self.nodes_by_name[name]["dtype"] != "bool" and _raw_use(expr, k) else i
               for k, (i, name) in enumerate(zip(ins, n["inputs"], strict=True))]
        out = self.expr(attrs["expr"], ins)
        return out if attrs["dtype"] in FLOATS else self.cast_to(out, attrs["dtype"])

    def expr(self, e: dict[str, Any], ins: list[str]) -> str:
        if "in" in e:
            return ins[e["in"]]
        if "const" in e:
            return self.const(float(e["const"]), np.float32)
        op = e["op"]
        args = [self.expr(a, ins) for a in e.get("args", [])]
        if "scalar" in e and e["scalar"] is not None:
            args.append(self.const(float(e["scalar"]), np.float32))
        if op == "to_dtype":
            return self.cast_to(args[0], e["dtype"])
        if op == "rsqrt":
            return self.op("Reciprocal", self.op("Sqrt", args[0]))
        if op == "silu":
            return self.act(args[0], "silu")
        if op == "log1p":
            return self.op("Log", self.op("Add", args[0], self.const(1.0, np.float32)))
        if op in _UNARY:
            return self.op(_UNARY[op], args[0])
        if op in _BINARY:
            return self.op(_BINARY[op], *args)
        raise Unsupported(f"pointwise op {op!r}")
