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
  (and `attn.mask.w<W>` per sliding window W) [B, 1, Tq, C + Tq] additive,
  `attn.out_index` [T] (padded row of each flat token), `attn.layer_stride` [1] (cache
  slots per layer and K/V half) and `kv_cache` [2·L·S, kv_heads, head_dim], read only.
* outputs: the plan's output (logits) and `kv_new` [L, 2, T, kv_heads, head_dim], the
  step's keys (after RoPE) and values, which the runtime writes into the paged cache.

Weights are not copied: initializers are external data pointing into the engine's
safetensors file (offset and length of each tensor), so the engine gains a few hundred KB.
Where onnxruntime's kernel wants another layout (int8 codes as offset uint8, transposed
dense matrices), the graph states the conversion on the initializer and onnxruntime folds
it once at load. Quantized GEMMs use `MatMulNBits` (4- and 8-bit, blockwise, activations
quantized to int8 per block of K: accuracy_level 4), the kernel onnxruntime-genai uses;
SmoothQuant's W8A8 uses the u8s8 `DynamicQuantizeMatMul`, much faster for many rows.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llm_engine.builder.onnx_export_report import OnnxExport
from llm_engine.kernels.quant import FORMAT_OPERANDS
from llm_engine.runtime.onnx_backend import KV_OUTPUT

OPSET = 21

_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
           "bfloat16": TensorProto.BFLOAT16, "int8": TensorProto.INT8,
           "uint8": TensorProto.UINT8, "int32": TensorProto.INT32, "int64": TensorProto.INT64,
           "bool": TensorProto.BOOL, "float8_e4m3fn": TensorProto.FLOAT8E4M3FN}
_ST_DTYPES = {"F32": TensorProto.FLOAT, "F16": TensorProto.FLOAT16, "BF16": TensorProto.BFLOAT16,
              "I8": TensorProto.INT8, "U8": TensorProto.UINT8, "I32": TensorProto.INT32,
              "I64": TensorProto.INT64, "F8_E4M3": TensorProto.FLOAT8E4M3FN}
_FLOATS = {"float32", "float16", "bfloat16"}
_ATTN_INPUTS = ("slot_mapping", "block_tables", "context_lens", "query_start_loc")
_UNARY = {"neg": "Neg", "sqrt": "Sqrt", "exp": "Exp", "log": "Log", "tanh": "Tanh",
          "sigmoid": "Sigmoid", "relu": "Relu", "cos": "Cos", "sin": "Sin", "abs": "Abs",
          "reciprocal": "Reciprocal", "erf": "Erf"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow",
           "maximum": "Max", "minimum": "Min"}
# MatMulNBits takes power-of-two blocks of K from 16 up.
_NBITS_BLOCKS = (16, 32, 64, 128, 256)


INT8_BLOCK = 16


class Unsupported(Exception):
    """The plan has something the ONNX graph cannot express; the engine keeps the reference
    path on CPU and report.json says why."""


def _safetensors_index(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, header


class _Emitter:
    def __init__(self, plan: dict[str, Any], weights_file: Path) -> None:
        self.plan = plan
        self.nodes_by_name = {n["name"]: n for n in plan["nodes"]}
        self.weights_file = weights_file
        self.data_start, self.st_header = _safetensors_index(weights_file)
        self.onnx_nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.graph_inputs: list[onnx.ValueInfoProto] = []
        self.values: dict[str, Any] = {}  # IR name -> ONNX name, or a tuple for multi-output
        self.consts: dict[Any, str] = {}
        self.lowerings: dict[str, int] = {}
        self.counter = 0
        self.kv_outputs: list[str] = []
        self.windows: set[int] = set()
        self.shared: dict[tuple, str] = {}
        self.attn_rows: dict[str, str] = {}  # attention node -> its [1, T, h*d] rows
        self.syms = self._sym_sources()
        self.kv_layers = plan["kv_cache"]["layers"]

    # ---- helpers ------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}.{self.counter}"

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs
             ) -> list[str]:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        self.onnx_nodes.append(helper.make_node(op, inputs, outs, domain=domain or None,
                                                **attrs))
        return outs

    def op(self, op: str, *inputs: str, domain: str = "", **attrs) -> str:
        return self.node(op, list(inputs), 1, domain, **attrs)[0]

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.consts:
            name = self.fresh("const")
            self.inits.append(numpy_helper.from_array(arr, name))
            self.consts[key] = name
        return self.consts[key]

    def add_input(self, name: str, elem: int, shape: list[Any]) -> str:
        self.graph_inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def _sym_sources(self) -> dict[str, tuple[str, int]]:
        """Symbolic size -> (an input that has it, which dimension)."""
        out: dict[str, tuple[str, int]] = {}
        for inp in self.plan["inputs"]:
            if inp["name"] in _ATTN_INPUTS:
                continue
            for d, size in enumerate(inp["shape"]):
                if isinstance(size, str) and size.isidentifier():
                    out.setdefault(size, (inp["name"], d))
        return out

    def sym_value(self, expr: str) -> str:
        """A 1-element int64 tensor holding a symbolic size ("T", "N", "4*T")."""
        parts = [p.strip() for p in expr.split("*")]
        factor, name = 1, None
        for p in parts:
            if p.isdigit():
                factor *= int(p)
            elif p in self.syms and name is None:
                name = p
            else:
                raise Unsupported(f"symbolic size {expr!r}")
        if name is None:
            raise Unsupported(f"symbolic size {expr!r}")
        src, dim = self.syms[name]
        value = self.op("Shape", src, start=dim, end=dim + 1)
        return value if factor == 1 else self.op("Mul", value, self.const([factor]))

    def shape_tensor(self, shape: list[Any]) -> str:
        if all(isinstance(s, int) for s in shape):
            return self.const(shape)
        parts = []
        for s in shape:
            if isinstance(s, int):
                parts.append(self.const([s]))
            elif isinstance(s, dict) and set(s) == {"sym"}:
                parts.append(self.sym_value(str(s["sym"])))
            else:
                raise Unsupported(f"shape entry {s!r}")
        return self.op("Concat", *parts, axis=0)

    def weight(self, node: dict[str, Any]) -> str:
        """An initializer backed by the safetensors file, no copy."""
        key = node["attrs"]["name"]
        entry = self.st_header.get(key)
        if entry is None:
            raise Unsupported(f"weight {key!r} is not in the weights file")
        begin, end = entry["data_offsets"]
        tensor = onnx.TensorProto()
        tensor.name = node["name"]
        tensor.data_type = _ST_DTYPES[entry["dtype"]]
        tensor.dims.extend(entry["shape"])
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", self.weights_file.name),
                     ("offset", str(self.data_start + begin)), ("length", str(end - begin))):
            kv = tensor.external_data.add()
            kv.key, kv.value = k, v
        self.inits.append(tensor)
        return node["name"]

    def as_float(self, name: str, dtype: str) -> str:
        return name if dtype == "float32" else self.op("Cast", name, to=TensorProto.FLOAT)

    # ---- ops ----------------------------------------------------------------------------
    def emit(self, n: dict[str, Any]) -> None:
        op, attrs = n["op"], n["attrs"]
        ins = [self.values[i] for i in n["inputs"]]
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            if op in _UNARY or op in _BINARY or op == "rsqrt" or op == "silu":
                out = self.expr({"op": op, "args": [{"in": i} for i in range(len(ins))],
                                 **({"scalar": attrs["scalar"]} if "scalar" in attrs else {})},
                                ins)
            else:
                raise Unsupported(f"op {op!r} ({n['name']}) has no ONNX lowering")
        else:
            out = handler(n, ins, attrs)
        self.values[n["name"]] = out

    def op_input(self, n, ins, attrs):
        if n["name"] in _ATTN_INPUTS:
            return None
        # plan dims: a size, a symbol ("T") or -1 (any); ONNX: int, named dim or None
        dims = [None if s == -1 else s for s in n["shape"]]
        return self.add_input(n["name"], _DTYPES[n["dtype"]], dims)

    def op_weight(self, n, ins, attrs):
        return self.weight(n)

    def op_reshape(self, n, ins, attrs):
        rows = self.attention_rows(n)
        if rows is not None:
            return rows
        return self.op("Reshape", ins[0], self.shape_tensor(attrs["shape"]))

    def attention_rows(self, n: dict[str, Any]) -> str | None:
        """The plan turns attention's [1, h, T, d] back into [1, T, h*d] with
        reshape(transpose(attention, 1, 2)) (an identity reshape may sit in between); the
        graph already has those rows, so the chain costs nothing."""
        t = self.nodes_by_name[n["inputs"][0]]
        if len(n["shape"]) != 3 or t["op"] != "transpose" \
                or {t["attrs"]["dim0"] % 4, t["attrs"]["dim1"] % 4} != {1, 2}:
            return None
        src = self.nodes_by_name[t["inputs"][0]]
        if src["op"] == "reshape" and src["shape"] == self.nodes_by_name[src["inputs"][0]]["shape"]:
            src = self.nodes_by_name[src["inputs"][0]]
        if src["name"] not in self.attn_rows or n["shape"][2] != src["shape"][1] * src["shape"][3]:
            return None
        return self.attn_rows[src["name"]]

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

    def op_index_select(self, n, ins, attrs):
        return self.op("Gather", ins[0], ins[1], axis=attrs["dim"])

    def op_to_dtype(self, n, ins, attrs):
        return self.cast_to(ins[0], attrs["dtype"])

    def cast_to(self, name: str, dtype: str) -> str:
        # Float activations are float32 throughout: onnxruntime's CPU kernels are fp32.
        return self.op("Cast", name, to=TensorProto.FLOAT if dtype in _FLOATS else _DTYPES[dtype])

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

    def op_linear(self, n, ins, attrs):
        fmt = attrs.get("b_format", "dense")
        operands = FORMAT_OPERANDS.get(fmt)
        if operands is None:
            raise Unsupported(f"linear format {fmt!r}")
        w_node = self.nodes_by_name[n["inputs"][1]]
        n_out, k = w_node["shape"][0], w_node["shape"][-1] * (2 if fmt == "int4_group" else 1)
        bias = ins[1 + operands] if len(ins) > 1 + operands else None
        x = ins[0]
        if fmt == "dense":
            w = self.as_float(ins[1], w_node["dtype"])
            y = self.op("MatMul", x, self.op("Transpose", w, perm=[1, 0]))
            kind = "MatMul (fp32)"
        elif fmt == "int4_group":
            float_zero = self.nodes_by_name[n["inputs"][3]]["dtype"] != "uint8"
            y, kind = self.int4(x, ins[1], ins[2], ins[3], n_out, k, attrs["group_size"],
                                float_zero)
        elif fmt == "int8_channel":
            y, kind = self.int8(x, ins[1], ins[2], n_out, k)
        elif fmt in ("int8_channel", "int8_channel_a8"):
            rank = len(self.nodes_by_name[n["inputs"][0]]["shape"])
            y, kind = self.int8_a8(x, ins[1], ins[2], n_out, k, rank)
        elif fmt == "fp8_channel_a8_token":
            y, kind = self.fp8_token(x, ins[1], ins[2])
        elif fmt == "fp8_channel_a8_group":
            rank = len(self.nodes_by_name[n["inputs"][0]]["shape"])
            y, kind = self.fp8_group(x, ins[1], ins[2], k, rank, attrs["group_size"])
        else:
            y, kind = self.fp8(x, ins[1], ins[2], ins[3])
        self.lowerings[kind] = self.lowerings.get(kind, 0) + 1
        if bias is not None:
            bias_dtype = self.nodes_by_name[n["inputs"][1 + operands]]["dtype"]
            y = self.op("Add", y, self.as_float(bias, bias_dtype))
        return y

    def int4(self, x, packed, scales, zeros, n_out, k, group, float_zero):
        blocks = k // group
        if group not in _NBITS_BLOCKS:
            # MatMulNBits takes power-of-two groups only: dequantize once at load instead.
            lo = self.op("BitwiseAnd", packed, self.const(15, np.uint8))
            hi = self.op("BitShift", packed, self.const(4, np.uint8), direction="RIGHT")
            q = self.op("Concat", self.op("Unsqueeze", lo, self.const([-1])),
                        self.op("Unsqueeze", hi, self.const([-1])), axis=-1)
            q = self.op("Cast", self.op("Reshape", q, self.const([n_out, blocks, group])),
                        to=TensorProto.FLOAT)
            z = self.op("Cast", self.op("Unsqueeze", zeros, self.const([-1])),
                        to=TensorProto.FLOAT)
            w = self.op("Mul", self.op("Sub", q, z),
                        self.op("Unsqueeze", scales, self.const([-1])))
            w = self.op("Reshape", w, self.const([n_out, k]))
            return (self.op("MatMul", x, self.op("Transpose", w, perm=[1, 0])),
                    f"MatMul (int4 g{group} dequantized)")
        # Our packing is MatMulNBits' B byte for byte ([N, K/2], low nibble = even column);
        # only the zero points need two to a byte, which the graph does on the initializer.
        b = self.op("Reshape", packed, self.const([n_out, blocks, group // 2]))
        s = self.op("Reshape", scales, self.const([-1]))
        if not float_zero:  # uint8 zero points: engines from before float ones
            z = self.pack_zero_points(zeros, n_out, blocks)
            y = self.op("MatMulNBits", x, b, s, z, domain="com.microsoft", K=k, N=n_out,
                        bits=4, block_size=group, accuracy_level=4)
            return y, f"MatMulNBits 4-bit g{group}"
        # MatMulNBits takes float zero points too, but then leaves its fast kernels (9-30x
        # slower at one row here). So it gets the nearest integers, and the rest is llama.cpp's
        # Q4_1 trick: (q - z) s = (q - round(z)) s - (z - round(z)) s, and the last term is
        # one number per (row, group), so its product with x is x's per-group sums [.., K/G]
        # (x times a 0/1 [K, K/G] matrix: one op, where Reshape + ReduceSum are two) times a
        # [K/G, N] matrix. Three small ops, ~8 us per GEMM at one row.
        zi = self.op("Round", zeros)
        y = self.op("MatMulNBits", x, b, s, self.pack_zero_points(zi, n_out, blocks),
                    domain="com.microsoft", K=k, N=n_out, bits=4, block_size=group,
                    accuracy_level=4)
        frac = self.op("Transpose", self.op("Mul", self.op("Sub", zeros, zi), scales),
                       perm=[1, 0])
        member = np.zeros((k, blocks), np.float32)
        member[np.arange(k), np.arange(k) // group] = 1.0
        sums = self.op("MatMul", x, self.const(member, np.float32))
        return self.op("Sub", y, self.op("MatMul", sums, frac)), \
            f"MatMulNBits 4-bit g{group} + zero-point offsets"

    def pack_zero_points(self, zeros: str, n_out: int, blocks: int) -> str:
        if blocks % 2:
            zeros = self.op("Pad", zeros, self.const([0, 0, 0, 1]))
            blocks += 1
        z = self.op("Cast", self.op("Reshape", zeros, self.const([n_out, blocks // 2, 2])),
                    to=TensorProto.INT32)
        lo = self.op("Gather", z, self.const(0), axis=2)
        hi = self.op("Mul", self.op("Gather", z, self.const(1), axis=2), self.const(16, np.int32))
        packed = self.op("Cast", self.op("Add", lo, hi), to=TensorProto.UINT8)
        return self.op("Reshape", packed, self.const([-1]))

    def int8(self, x, q, scale, n_out, k):
        # One scale per channel, repeated over blocks of K (zero-padded where 16 does not divide
        # K). The kernel rounds activations to int8 per block of K, so the block sets that
        # error: on SmolLM2 blocks of 64/128 cost +0.86% perplexity, 32 +0.43%, 16 +0.31%
        # (weight-only arithmetic: +0.07%); a quick batch-1 check saw no slowdown beyond noise.
        block = INT8_BLOCK
        blocks = -(-k // block)
        # Symmetric int8 codes -> MatMulNBits' unsigned codes with zero point 128.
        u = self.op("Cast", self.op("Add", self.op("Cast", q, to=TensorProto.INT32),
                                    self.const(128, np.int32)), to=TensorProto.UINT8)
        if blocks * block != k:
            u = self.op("Pad", u, self.const([0, 0, 0, blocks * block - k]),
                        self.const(128, np.uint8))
        b = self.op("Reshape", u, self.const([n_out, blocks, block]))
        s = self.op("Reshape", self.op("Expand", self.op("Unsqueeze", scale, self.const([1])),
                                       self.const([n_out, blocks])), self.const([-1]))
        z = self.const(np.full(n_out * blocks, 128, np.uint8), np.uint8)
        y = self.op("MatMulNBits", x, b, s, z, domain="com.microsoft", K=k, N=n_out, bits=8,
                    block_size=block, accuracy_level=4)
        return y, f"MatMulNBits 8-bit g{block}"

    def int8_a8(self, x, q, scale, n_out, k, rank):
        """W8A8 with per-token dynamic activation scales on onnxruntime's u8s8 GEMM, whose
        activation quantization is per tensor: rows are scaled to amax 1 and an anchor row
        (1, -1, 0, ...) pins the tensor's range to [-1, 1], so every token gets the same
        255-level grid over its own range whatever else is in the batch."""
        amax = self.op("Max", self.op("ReduceMax", self.op("Abs", x), self.const([-1]),
                                      keepdims=1), self.const(1e-30, np.float32))
        anchor = np.zeros((1,) * (rank - 1) + (k,), np.float32)
        anchor[..., 0], anchor[..., 1 % k] = 1.0, -1.0
        rows = self.op("Concat", self.op("Div", x, amax), self.const(anchor, np.float32),
                       axis=-2)
        # u8s8 on AVX2 multiplies with VPMADDUBSW, whose int16 pair sums saturate with full
        # 8-bit weights; unsigned weights (zero point 128) take the u8u8 kernel, which does not.
        u = self.op("Cast", self.op("Add", self.op("Cast", q, to=TensorProto.INT32),
                                    self.const(128, np.int32)), to=TensorProto.UINT8)
        y = self.op("DynamicQuantizeMatMul", rows, self.op("Transpose", u, perm=[1, 0]), scale,
                    self.const(np.full(n_out, 128, np.uint8), np.uint8), domain="com.microsoft")
        y = self.op("Slice", y, self.const([0]), self.const([-1]), self.const([-2]))
        return self.op("Mul", y, amax), "DynamicQuantizeMatMul (per-token int8)"

    def fp8(self, x, q, scale, x_scale):
        # Weights dequantized once at load; activations rounded through e4m3 with the static
        # calibration scale, as the reference does.
        return self.op("Mul", self.e4m3_matmul(x, x_scale, q, scale), x_scale), \
            "MatMul (fp8 dequantized)"

    def fp8_token(self, x, q, scale):
        # As fp8, with each row's own scale amax|x_row| / 448 (an all-zero row stays zero).
        a = self.e4m3_scale(x)
        return self.op("Mul", self.e4m3_matmul(x, a, q, scale), a), \
            "MatMul (fp8 per-token, dequantized)"

    def fp8_group(self, x, q, scale, k, rank, group):
        # As fp8_token, one scale per token and group of `group` channels: x viewed as
        # [..., K / group, group], each group rounded through e4m3 on its own amax, then the
        # dequantized x (xq * a) times the dequantized weight.
        keep = [0] * (rank - 1)
        xg = self.op("Reshape", x, self.const([*keep, k // group, group]))
        a = self.e4m3_scale(xg)
        xd = self.op("Reshape", self.op("Mul", self.e4m3(xg, a), a), self.const([*keep, k]))
        return self.op("MatMul", xd, self.fp8_weight_t(q, scale)), \
            f"MatMul (fp8 per-token-group g{group}, dequantized)"

    def e4m3_scale(self, x):
        """amax|x| / 448 over the last axis, kept (a zero row gets a tiny scale: it stays 0)."""
        amax = self.op("Max", self.op("ReduceMax", self.op("Abs", x), self.const([-1]),
                                      keepdims=1), self.const(1e-30, np.float32))
        return self.op("Div", amax, self.const(448.0, np.float32))

    def e4m3(self, x, a):
        """e4m3(clamp(x / a, +-448)) as float, a broadcasting against x."""
        xs = self.op("Clip", self.op("Div", x, a), self.const(-448.0, np.float32),
                     self.const(448.0, np.float32))
        return self.op("Cast", self.op("Cast", xs, to=TensorProto.FLOAT8E4M3FN),
                       to=TensorProto.FLOAT)

    def fp8_weight_t(self, q, scale):
        """(q * scale[:, None])^T as float: the fp8 weight dequantized (once, at load)."""
        w = self.op("Mul", self.op("Cast", q, to=TensorProto.FLOAT),
                    self.op("Unsqueeze", scale, self.const([1])))
        return self.op("Transpose", w, perm=[1, 0])

    def e4m3_matmul(self, x, a, q, scale):
        """e4m3(x / a) @ (q * scale)^T, a broadcasting against x."""
        return self.op("MatMul", self.e4m3(x, a), self.fp8_weight_t(q, scale))

    def op_matmul(self, n, ins, attrs):
        return self.op("MatMul", ins[0], ins[1])

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

    def token_rows(self, name: str, heads: int, d: int) -> str | None:
        """The [1, T, heads*d] ONNX value behind an attention input that the plan formed as
        transpose(reshape([1, T, heads*d] -> [1, T, heads, d]), 1, 2), so the graph can skip
        the round trip through [1, heads, T, d]; None for any other producer."""
        node = self.nodes_by_name[name]
        if node["op"] != "transpose" or {node["attrs"]["dim0"] % 4, node["attrs"]["dim1"] % 4} \
                != {1, 2}:
            return None
        view = self.nodes_by_name[node["inputs"][0]]
        src = self.nodes_by_name[view["inputs"][0]] if view["op"] == "reshape" else None
        if src is None or view["shape"][2:] != [heads, d] or len(src["shape"]) != 3 \
                or src["shape"][2] != heads * d or src["shape"][0] != 1:
            return None
        return self.values[src["name"]]

    def rope_tables_ok(self, cos: str, sin: str, dim: int) -> bool:
        """onnxruntime's RotaryEmbedding takes half-width tables: usable when the plan's
        [1, 1, T, d] cos/sin are elementwise functions of cat(f, f) on the last axis (HF's
        rotate-half tables), so both halves are equal."""
        for name in (cos, sin):
            shape = self.nodes_by_name[name]["shape"]
            if len(shape) != 4 or shape[:2] != [1, 1] or shape[3] != dim or dim % 2:
                return False
            for _ in range(8):
                node = self.nodes_by_name[name]
                rank = len(node["shape"]) if isinstance(node["shape"][0], (int, str)) else 0
                if node["op"] == "cat":
                    ins = node["inputs"]
                    if not (len(ins) == 2 and ins[0] == ins[1]
                            and node["attrs"]["dim"] in (-1, rank - 1)):
                        return False
                    break
                if (node["op"] == "unsqueeze" and node["attrs"]["dim"] not in (-1, rank - 1)) or (node["op"] in ("pointwise", "to_dtype") and len(node["inputs"]) == 1):
                    name = node["inputs"][0]
                else:
                    return False
            else:
                return False
        return True

    def rotary(self, x, cos, sin, dim, heads):
        """RoPE as one onnxruntime RotaryEmbedding node on [1, heads, T, d]: the step's own
        tables (rows 0..T-1, first halves) with positions 0..T-1 select row t for token t."""
        def table(t):
            return self.step_once(("rope", t), lambda: self.op(
                "Slice", self.op("Reshape", t, self.const([-1, dim])), self.const([0]),
                self.const([dim // 2]), self.const([1])))

        positions = self.step_once(("rope_pos", cos), lambda: self.op(
            "Unsqueeze", self.op("Range", self.const(0), self.op(
                "Squeeze", self.op("Shape", cos, start=2, end=3), self.const([0])),
                self.const(1)), self.const([0])))
        return self.op("RotaryEmbedding", x, positions, table(cos), table(sin),
                       domain="com.microsoft", interleaved=0, num_heads=heads)

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
        out = self.expr(attrs["expr"], ins)
        return out if attrs["dtype"] in _FLOATS else self.cast_to(out, attrs["dtype"])

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
        if op in _UNARY:
            return self.op(_UNARY[op], args[0])
        if op in _BINARY:
            return self.op(_BINARY[op], *args)
        raise Unsupported(f"pointwise op {op!r}")

    # ---- attention ----------------------------------------------------------------------
    def op_paged_attention(self, n, ins, attrs):
        if attrs.get("kv_head_map") is not None:
            raise Unsupported("attention with a per-rank kv_head_map (tensor parallel)")
        if attrs.get("kv_dtype"):
            raise Unsupported(f"quantized KV cache ({attrs['kv_dtype']})")
        q_shape = n["shape"]
        if len(q_shape) != 4 or q_shape[0] != 1:
            raise Unsupported(f"attention output shape {q_shape}")
        layer = attrs["layer"]
        h, kvh, d = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
        if h is None or kvh is None or d is None or h % kvh:
            raise Unsupported("attention without uniform head grouping")
        q, k, v = ins[0], ins[1], ins[2]
        rows = [self.token_rows(name, heads, d) for name, heads in
                zip(n["inputs"][:3], (h, kvh, kvh))]
        fast_rope = len(ins) > 7 and ins[7] is not None and self.rope_tables_ok(
            n["inputs"][7], n["inputs"][8], d)

        def flat(x, heads):  # [1, heads, T, d] -> [T, heads, d]
            return self.op("Reshape", self.op("Transpose", x, perm=[0, 2, 1, 3]),
                           self.const([-1, heads, d]))

        def prepared(x, heads, token_rows, rotate):  # -> [T, heads, d], RoPE applied
            if token_rows is not None:  # [1, T, heads*d] straight from the projection
                if rotate:
                    token_rows = self.rotary(token_rows, ins[7], ins[8], d, heads)
                return self.op("Reshape", token_rows, self.const([-1, heads, d]))
            if rotate:
                x = (self.rotary(x, ins[7], ins[8], d, heads) if fast_rope
                     else self.rope(x, ins[7], ins[8], d))
            return flat(x, heads)

        has_rope = len(ins) > 7 and ins[7] is not None
        qf = prepared(q, h, rows[0] if fast_rope else None, has_rope)
        kf = prepared(k, kvh, rows[1] if fast_rope else None, has_rope)
        vf = prepared(v, kvh, rows[2], False)
        cache_dtype = _DTYPES[self.kv_layers[layer]["dtype"]]
        k_store, v_store = kf, vf
        if cache_dtype != TensorProto.FLOAT:
            k_store = self.op("Cast", kf, to=cache_dtype)
            v_store = self.op("Cast", vf, to=cache_dtype)
        self.kv_outputs += [k_store, v_store]

        window = attrs.get("window")
        mask = "attn.mask" if window is None else f"attn.mask.w{int(window)}"
        if window is not None:
            self.windows.add(int(window))
        qp = self.op("Gather", qf, "attn.q_index", axis=0)  # [B, Tq, h, d]

        def past(half):  # this layer's K or V of the earlier context: [B, C, kvh, d]
            offset = self.op("Mul", "attn.layer_stride", self.const([2 * layer + half]))
            rows = self.op("Gather", "kv_cache", self.op("Add", "attn.ctx_slots", offset), axis=0)
            return rows if cache_dtype == TensorProto.FLOAT else self.op(
                "Cast", rows, to=TensorProto.FLOAT)

        kp, vp = past(0), past(1)
        kc = self.op("Gather", kf, "attn.q_index", axis=0)  # [B, Tq, kvh, d]
        vc = self.op("Gather", vf, "attn.q_index", axis=0)
        scale = self.const(float(attrs["scale"]), np.float32)
        if kvh <= 4:
            out = self.attend_grouped(qp, kp, vp, kc, vc, mask, scale, h, kvh, d)
        else:
            out = self.attend_heads(qp, kp, vp, kc, vc, mask, scale, h, kvh, d)
        # [B, Tq, h, d] -> the flat tokens -> the op's [1, h, T, d]
        out = self.op("Gather", self.op("Reshape", out, self.const([-1, h * d])),
                      "attn.out_index", axis=0)  # [T, h*d]
        self.attn_rows[n["name"]] = self.op("Unsqueeze", out, self.const([0]))
        return self.op("Transpose", self.op("Reshape", out, self.const([1, -1, h, d])),
                       perm=[0, 2, 1, 3])

    def step_once(self, key: tuple, make) -> str:
        """A value computed once per step and shared by every layer (mask layouts)."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]

    def attend_grouped(self, qp, kp, vp, kc, vc, mask, scale, h, kvh, d):
        """Few KV heads (GQA/MQA): keys and values stay in the cache's [B, C, kvh*d] layout,
        which costs no transpose or concat of the large tensors. Each query is spread over
        all kvh*d columns with zeros outside its KV head's block, so one GEMM per sequence
        gives every head's scores (kvh times the small attention FLOPs), softmax axis last."""
        g = h // kvh
        own = np.zeros((h, kvh), np.float32)
        for head in range(h):
            own[head, head // g] = 1.0
        own5 = self.const(own.reshape(1, h, 1, kvh, 1), np.float32)
        qt = self.op("Transpose", qp, perm=[0, 2, 1, 3])  # [B, h, Tq, d]
        qbd = self.op("Mul", self.op("Unsqueeze", qt, self.const([3])), own5)
        qbd = self.op("Reshape", qbd, self.const([0, 0, 0, kvh * d]))  # [B, h, Tq, kvh*d]
        flat = self.const([0, 0, kvh * d])

        def rows(x):  # [B, n, kvh, d] -> [B, 1, n, kvh*d], broadcast over the heads
            return self.op("Unsqueeze", self.op("Reshape", x, flat), self.const([1]))

        kp2, vp2 = rows(kp), rows(vp)
        # This step's own keys (few for decode, a chunk for prefill) take per-KV-head GEMMs:
        # no wasted FLOPs where a prefill chunk's Tq x Tq block is the big one.
        q_kv = self.op("Reshape", self.op("Transpose", self.op(
            "Reshape", qp, self.const([0, 0, kvh, g, d])), perm=[0, 2, 3, 1, 4]),
            self.const([0, kvh, -1, d]))  # [B, kvh, g*Tq, d]
        kc_t = self.op("Transpose", kc, perm=[0, 2, 1, 3])  # [B, kvh, Tq, d]
        vc_t = self.op("Transpose", vc, perm=[0, 2, 1, 3])
        heads = self.const([0, h, -1, 0])  # [B, kvh, g*Tq, n] -> [B, h, Tq, n]

        def nt(a, b):
            return self.op("FusedMatMul", a, b, domain="com.microsoft", transA=0, transB=1,
                           alpha=1.0)

        s_cur = self.op("Reshape", nt(q_kv, kc_t), heads)
        scores = self.op("Concat", nt(qbd, kp2), s_cur, axis=-1)  # [B, h, Tq, C+Tq]
        probs = self.op("Softmax", self.op("Add", self.op("Mul", scores, scale), mask), axis=-1)
        n_past = self.op("Shape", kp, start=1, end=2)
        p_past = self.op("Slice", probs, self.const([0]), n_past, self.const([3]))
        p_cur = self.op("Slice", probs, n_past, self.const([2**62]), self.const([3]))
        past = self.op("Reshape", self.op("MatMul", p_past, vp2), self.const([0, 0, 0, kvh, d]))
        # [B, h, Tq, kvh, d]: keep each head's own KV head
        out = self.op("ReduceSum", self.op("Mul", past, own5), self.const([3]), keepdims=0)
        p_cur = self.op("Reshape", p_cur, self.const([0, kvh, -1, 0]))
        cur = self.op("Reshape", self.op("MatMul", p_cur, vc_t), self.const([0, h, -1, d]))
        out = self.op("Add", out, cur)
        return self.op("Transpose", out, perm=[0, 2, 1, 3])  # [B, Tq, h, d]

    def attend_heads(self, qp, kp, vp, kc, vc, mask, scale, h, kvh, d):
        """Many KV heads (MHA): batched per-head GEMMs over [B, kvh, C+Tq, d] keys."""
        g = h // kvh
        q = self.op("Reshape", self.op("Transpose", self.op(
            "Reshape", qp, self.const([0, 0, kvh, g, d])), perm=[0, 2, 3, 1, 4]),
            self.const([0, kvh, -1, d]))  # [B, kvh, g*Tq, d]: a KV head's query heads by row

        def heads(p, c):
            return self.op("Transpose", self.op("Concat", p, c, axis=1), perm=[0, 2, 1, 3])

        keys, values = heads(kp, kc), heads(vp, vc)
        scores = self.op("Mul", self.op("FusedMatMul", q, keys, domain="com.microsoft",
                                        transA=0, transB=1, alpha=1.0), scale)
        tiled = self.step_once(("tiled", mask, g), lambda: self.op(
            "Tile", mask, self.const([1, 1, g, 1])))
        probs = self.op("Softmax", self.op("Add", scores, tiled), axis=-1)
        out = self.op("MatMul", probs, values)  # [B, kvh, g*Tq, d]
        return self.op("Reshape", self.op("Transpose", self.op(
            "Reshape", out, self.const([0, kvh, g, -1, d])), perm=[0, 3, 1, 2, 4]),
            self.const([0, 0, h, d]))  # [B, Tq, h, d]

    # ---- whole graph --------------------------------------------------------------------
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
        parts = [self.op("Unsqueeze", kv, self.const([0])) for kv in self.kv_outputs]
        kv = self.op("Concat", *parts, axis=0)  # [2L, T, kvh, d]
        self.onnx_nodes.append(helper.make_node("Reshape", [kv, self.const(
            [len(layers), 2, -1, kvh, d])], [KV_OUTPUT]))
        cache_elem = _DTYPES[first["dtype"]]
        self.add_input("attn.q_index", TensorProto.INT64, ["B", "Tq"])
        self.add_input("attn.ctx_slots", TensorProto.INT64, ["B", "C"])
        self.add_input("attn.out_index", TensorProto.INT64, ["T"])
        self.add_input("attn.layer_stride", TensorProto.INT64, [1])
        self.add_input("kv_cache", cache_elem, ["S", kvh, d])
        for name in ["attn.mask"] + [f"attn.mask.w{w}" for w in sorted(self.windows)]:
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
