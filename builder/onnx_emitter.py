"""The ONNX emitter's core: the state of one export and the graph-building helpers every
lowering uses.

`EmitterCore` holds everything an export accumulates (ONNX nodes, initializers, graph inputs,
the IR value -> ONNX value map, shared per-step values, the report's lowering counts) and the
small tools that add to it: `op()` / `node()` append a node under a fresh name, `const()` adds
a deduplicated constant, `weight()` an initializer pointing into the engine's safetensors file
(no copy), `as_float()` / `cast_to()` the casts to onnxruntime's fp32 activations, symbolic
sizes as shape tensors. `emit()` dispatches one plan node to its `op_<name>` handler; the
handlers live in mixins over this class (`onnx_ops`, `onnx_gemm`, `onnx_attention`), composed
into the exporter's `_Emitter` in `onnx_export`, so one object keeps all of an export's state.

Names matter: values are named by a running counter, so the order in which handlers call
these helpers is the graph (tests/golden holds its node list byte for byte).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 23  # the fused `Attention` op

DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
           "bfloat16": TensorProto.BFLOAT16, "int8": TensorProto.INT8,
           "uint8": TensorProto.UINT8, "int32": TensorProto.INT32, "int64": TensorProto.INT64,
           "bool": TensorProto.BOOL, "float8_e4m3fn": TensorProto.FLOAT8E4M3FN}
_ST_DTYPES = {"F32": TensorProto.FLOAT, "F16": TensorProto.FLOAT16, "BF16": TensorProto.BFLOAT16,
              "I8": TensorProto.INT8, "U8": TensorProto.UINT8, "I32": TensorProto.INT32,
              "I64": TensorProto.INT64, "F8_E4M3": TensorProto.FLOAT8E4M3FN}
FLOATS = {"float32", "float16", "bfloat16"}
# Plan inputs only attention reads; the graph takes the runtime's `attn.*` metadata instead.
ATTN_INPUTS = ("slot_mapping", "block_tables", "context_lens", "query_start_loc")


class Unsupported(Exception):
    """The plan has something the ONNX graph cannot express; the engine keeps the reference
    path on CPU and report.json says why."""


def _safetensors_index(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, header


class EmitterCore:
    """An export's state and the helpers that add nodes, constants and initializers to it."""

    # IR ops without an `op_<name>` handler that `lower_elementwise` takes (see onnx_ops).
    ELEMENTWISE: ClassVar[frozenset[str]] = frozenset()

    lowering: str | None = None  # the plan node being lowered (names its ONNX nodes)

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
        # Named "<plan node>/<output>": `engine inspect --onnx` counts the nodes each plan node
        # (and so each layer) lowers to; the step's own plumbing is named by its output alone.
        name = f"{self.lowering}/{outs[0]}" if self.lowering else outs[0]
        self.onnx_nodes.append(helper.make_node(op, inputs, outs, name=name,
                                                domain=domain or None, **attrs))
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
            if inp["name"] in ATTN_INPUTS:
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

    def cast_to(self, name: str, dtype: str) -> str:
        # Float activations are float32 throughout: onnxruntime's CPU kernels are fp32.
        return self.op("Cast", name, to=TensorProto.FLOAT if dtype in FLOATS else DTYPES[dtype])

    def step_once(self, key: tuple, make) -> str:
        """A value computed once per step and shared by every layer (mask layouts)."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]

    def emit(self, n: dict[str, Any]) -> None:
        op, attrs = n["op"], n["attrs"]
        ins = [self.values[i] for i in n["inputs"]]
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            if op not in self.ELEMENTWISE:
                raise Unsupported(f"op {op!r} ({n['name']}) has no ONNX lowering")
            handler = self.lower_elementwise
        self.lowering = n["name"]
        try:
            self.values[n["name"]] = handler(n, ins, attrs)
        finally:
            self.lowering = None

    def lower_elementwise(self, n: dict[str, Any], ins: list[Any], attrs: dict[str, Any]) -> str:
        raise NotImplementedError  # onnx_ops.SimpleOps
