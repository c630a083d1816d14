"""lower_aten: turn the exported ATen graph into IR, folding the causal mask away.

Every ATen op maps to one IR op (or none, for no-ops such as `contiguous`, `dropout` in
eval mode and same-dtype casts). The attention mask HF builds from `position_ids` is
evaluated on concrete inputs: if it is causal (or a sliding window) it is dropped and the
attention node records that, because paged attention is causal by construction. An op with
no lowering fails the build, naming the op, the HF module it came from and the architecture.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import sympy
import torch
import torch.fx

from llm_engine.builder.errors import BuildError
from llm_engine.builder.frontend.trace import Traced
from llm_engine.builder.ir import Graph, WeightSpec
from llm_engine.builder.passes.report import PassReport
from llm_engine.kernels.dtypes import dtype_name

aten = torch.ops.aten
INT64_MAX = 2**63 - 1
T = sympy.Symbol("T")


# ---- symbolic sizes ------------------------------------------------------------------------
def sym_str(value) -> int | str:
    if isinstance(value, int):
        return value
    expr = value.node.expr
    expr = expr.subs({s: T for s in expr.free_symbols})
    return int(expr) if expr.is_number else str(expr)


def shape_of(val) -> tuple[int | str, ...]:
    return tuple(sym_str(s) for s in val.shape)


def module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<model>"
    path = list(stack.values())[-1][0]
    return path.removeprefix("m.").removeprefix("L['self'].m.") or "<model>"


# ---- causal mask folding -------------------------------------------------------------------
def _mask_arg(node: torch.fx.Node):
    if len(node.args) > 3:
        return node.args[3]
    return node.kwargs.get("attn_mask")


def _eval_mask(mask: torch.fx.Node, t: int) -> torch.Tensor:
    """Run the mask's subgraph on CPU for one sequence of t tokens at positions 0..t-1."""
    env: dict[torch.fx.Node, object] = {}
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    needed = sorted(_ancestors(mask) | {mask}, key=order.get)

    def val(a):
        return torch.fx.node.map_arg(a, lambda n: env[n])

    for n in needed:
        if n.op == "placeholder":
            if n.target == "input_ids":
                env[n] = torch.zeros(1, t, dtype=torch.long)
            elif n.target == "position_ids":
                env[n] = torch.arange(t).unsqueeze(0)
            else:
                raise BuildError(f"attention mask depends on weight {n.target}; cannot fold it")
        elif n.target is aten.sym_size.int:
            env[n] = t
        else:
            kwargs = {k: (torch.device("cpu") if k == "device" else v)
                      for k, v in val(n.kwargs).items()}
            env[n] = n.target(*val(n.args), **kwargs)
    return env[mask]


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def classify_mask(mask: torch.fx.Node) -> int | None:
    """Return None for a causal mask, W for a sliding window of W; raise otherwise."""
    t = 37
    m = _eval_mask(mask, t)
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    allowed = allowed.expand(1, 1, t, t)[0, 0]
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    if torch.equal(allowed, j <= i):
        return None
    for w in range(1, t):
        if torch.equal(allowed, (j <= i) & (j > i - w)):
            return w
    raise BuildError("attention mask is neither causal nor a sliding window; cannot fold it")


# ---- the lowering ----------------------------------------------------------------------
Handler = Callable[["Lowering", torch.fx.Node, list, dict], str | list[str] | None]
HANDLERS: dict[object, Handler] = {}


def handles(*targets):
    def register(fn: Handler) -> Handler:
        for target in targets:
            HANDLERS[target] = fn
        return fn

    return register


class Lowering:
    def __init__(self, traced: Traced, weights_available: Callable[[str], bool]) -> None:
        self.traced = traced
        self.fx = traced.program.graph_module.graph
        self.available = weights_available
        self.graph = Graph()
        self.env: dict[torch.fx.Node, object] = {}
        self.current: torch.fx.Node | None = None
        self.masks_folded = 0
        self.dropped: dict[str, int] = {}
        self.weight_nodes: dict[str, str] = {}  # engine weight name -> its node

    # helpers used by handlers ------------------------------------------------------------
    def emit(self, op: str, inputs: list[str], attrs: dict | None = None, *, val=None,
             node: torch.fx.Node | None = None) -> str:
        node = node or self.current
        val = node.meta["val"] if val is None else val
        origin = [f"{node.name}@{module_path(node)}"]
        return self.graph.add(op, inputs, shape_of(val), dtype_name(val.dtype), attrs=attrs,
                              origin=origin, name=node.name, order=len(self.graph)).name

    def value(self, a):
        """An fx argument as IR: tensor -> node name, SymInt -> {"sym": expr}."""
        if isinstance(a, torch.fx.Node):
            return self.env.get(a)  # None only for folded attention masks
        if isinstance(a, list | tuple):
            return [self.value(x) for x in a]
        if isinstance(a, torch.SymInt):
            return {"sym": str(sym_str(a))}
        if isinstance(a, torch.dtype):
            return dtype_name(a)
        return a

    def is_tensor(self, a) -> bool:
        return isinstance(a, str) and a in self.graph

    def fail(self, what: str) -> BuildError:
        assert self.current is not None
        return BuildError(
            f"{what} in module {module_path(self.current)} of {self.traced.architecture}: "
            "no lowering exists; file an issue with the model name"
        )

    # weights and inputs ------------------------------------------------------------------
    def weight(self, node: torch.fx.Node) -> str:
        state_name = self.traced.placeholder_names[node.target]
        name = self.traced.aliases.get(state_name, state_name)
        val = node.meta["val"]
        if name in self.traced.buffers:
            recipe = {"buffer": name}
            dtype = dtype_name(self.traced.buffers[name].dtype)
        else:
            found = next((n for n in (name, state_name) if self.available(n)), None)
            if found is None:
                raise BuildError(
                    f"checkpoint has no tensor {name!r} (used by {self.traced.architecture}); "
                    "the checkpoint is incomplete or for another model"
                )
            name, recipe = found, {"load": found}
            dtype = dtype_name(self.traced.param_dtypes.get(state_name, val.dtype))
        if name not in self.weight_nodes:
            spec = WeightSpec(name, tuple(int(s) for s in val.shape), dtype, recipe)
            origin = [f"{node.name}@{state_name}"]
            self.weight_nodes[name] = self.graph.add_weight(spec, origin=origin).name
        return self.weight_nodes[name]

    def constant(self, node: torch.fx.Node) -> str:
        """A tensor the graph reads as an attribute (a buffer or constant that export did not
        lift to an input, as some transformers versions' RoPE `inv_freq`): kept like a
        buffer, its value stored in the engine."""
        value = self.traced.program.graph_module
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        if not isinstance(value, torch.Tensor):
            raise self.fail(f"fx get_attr of a {type(value).__name__} ({node.target})")
        name = f"constant.{node.target}"
        if name not in self.weight_nodes:
            self.traced.buffers[name] = value.detach().clone()
            spec = WeightSpec(name, tuple(value.shape), dtype_name(value.dtype),
                              {"buffer": name})
            self.weight_nodes[name] = self.graph.add_weight(spec, origin=[node.name]).name
        return self.weight_nodes[name]

    # the walk ----------------------------------------------------------------------------
    def needed_nodes(self) -> set[torch.fx.Node]:
        """Nodes the logits depend on, not counting edges into attention masks."""
        output = next(n for n in self.fx.nodes if n.op == "output")
        seen: set[torch.fx.Node] = set()
        stack = [output]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            inputs = list(n.all_input_nodes)
            if n.target is aten.scaled_dot_product_attention.default:
                mask = _mask_arg(n)
                inputs = [i for i in inputs if i is not mask]
            stack.extend(inputs)
        return seen

    def run(self) -> Graph:
        needed = self.needed_nodes()
        for node in self.fx.nodes:
            self.current = node
            if node not in needed:
                if node.op == "call_function":
                    self.dropped[str(node.target)] = self.dropped.get(str(node.target), 0) + 1
                continue
            if node.op == "placeholder":
                if node.target in self.traced.placeholder_names:
                    self.env[node] = self.weight(node)
                else:
                    self.env[node] = self.emit("input", [], {"name": node.target})
                    self.graph.inputs.append(self.env[node])
            elif node.op == "output":
                outs = node.args[0]
                self.graph.outputs = [self.env[o] for o in outs]
            elif node.op == "call_function":
                self.env[node] = self.lower_call(node)
            elif node.op == "get_attr":
                self.env[node] = self.constant(node)
            else:
                raise self.fail(f"fx node kind {node.op}")
        self.graph.dce()
        return self.graph

    def lower_call(self, node: torch.fx.Node):
        target = node.target
        if target is aten.sym_size.int:
            return {"sym": str(sym_str(node.meta["val"]))}
        handler = HANDLERS.get(target) or HANDLERS.get(getattr(target, "overloadpacket", None))
        if handler is None:
            raise self.fail(f"unsupported op {target}")
        args = [self.value(a) for a in node.args]
        kwargs = {k: self.value(v) for k, v in node.kwargs.items()}
        return handler(self, node, args, kwargs)


# ---- handlers -------------------------------------------------------------------------
@handles(aten._assert_tensor_metadata.default, aten._assert_scalar.default,
         aten.sym_constrain_range_for_size.default)
def _skip(lo, node, args, kwargs):
    return None


@handles(aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
         aten.lift_fresh_copy.default, aten.dropout.default)
def _identity(lo, node, args, kwargs):
    if node.target is aten.dropout.default and args[2]:
        raise lo.fail("dropout in training mode")
    return args[0]


@handles(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
         aten.type_as.default)
def _cast(lo, node, args, kwargs):
    src = lo.graph.node(args[0])
    dtype = dtype_name(node.meta["val"].dtype)
    if dtype == src.dtype:
        return args[0]
    return lo.emit("to_dtype", [args[0]], {"dtype": dtype})


_UNARY = {aten.neg: "neg", aten.rsqrt: "rsqrt", aten.sqrt: "sqrt", aten.exp: "exp",
          aten.log: "log", aten.tanh: "tanh", aten.sigmoid: "sigmoid", aten.silu: "silu",
          aten.relu: "relu", aten.cos: "cos", aten.sin: "sin", aten.abs: "abs",
          aten.reciprocal: "reciprocal", aten.erf: "erf"}
_BINARY = {aten.add: "add", aten.sub: "sub", aten.mul: "mul", aten.div: "div",
           aten.pow: "pow", aten.maximum: "maximum", aten.minimum: "minimum"}


def _unary(lo, node, args, kwargs):
    return lo.emit(_UNARY[node.target.overloadpacket], [args[0]])


def _binary(lo, node, args, kwargs):
    op = _BINARY[node.target.overloadpacket]
    a, b = args[0], args[1]
    if kwargs.get("rounding_mode") is not None:
        raise lo.fail(f"div with rounding_mode={kwargs['rounding_mode']}")
    alpha = kwargs.get("alpha", 1)
    if alpha != 1:
        if not lo.is_tensor(b):
            b = b * alpha
        else:
            raise lo.fail(f"{op} with alpha={alpha}")
    for x in (a, b):
        if isinstance(x, dict):
            raise lo.fail(f"{op} with a symbolic scalar")
    if lo.is_tensor(a) and lo.is_tensor(b):
        return lo.emit(op, [a, b])
    if lo.is_tensor(a):
        return lo.emit(op, [a], {"scalar": b, "scalar_first": False})
    return lo.emit(op, [b], {"scalar": a, "scalar_first": True})


for _packet in _UNARY:
    handles(_packet)(_unary)
for _packet in _BINARY:
    handles(_packet)(_binary)


@handles(aten.gelu.default)
def _gelu(lo, node, args, kwargs):
    return lo.emit("gelu", [args[0]], {"approximate": kwargs.get("approximate", "none")})


@handles(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default)
def _reduce(lo, node, args, kwargs):
    op = {aten.mean: "mean", aten.sum: "sum", aten.amax: "amax"}[node.target.overloadpacket]
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if kwargs.get("dtype") is not None:
        raise lo.fail(f"{op} with dtype")
    return lo.emit(op, [args[0]], {"dims": list(dims), "keepdim": bool(keepdim)})


@handles(aten.softmax.int, aten._softmax.default)
def _softmax(lo, node, args, kwargs):
    return lo.emit("softmax", [args[0]], {"dim": args[1],
                                          "dtype": dtype_name(node.meta["val"].dtype)})


@handles(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(lo, node, args, kwargs):
    return lo.emit("reshape", [args[0]], {"shape": list(args[1])})


@handles(aten.expand.default)
def _expand(lo, node, args, kwargs):
    return lo.emit("expand", [args[0]], {"shape": list(args[1])})


@handles(aten.transpose.int)
def _transpose(lo, node, args, kwargs):
    return lo.emit("transpose", [args[0]], {"dim0": args[1], "dim1": args[2]})


@handles(aten.t.default)
def _t(lo, node, args, kwargs):
    return lo.emit("transpose", [args[0]], {"dim0": 0, "dim1": 1})


@handles(aten.permute.default)
def _permute(lo, node, args, kwargs):
    return lo.emit("permute", [args[0]], {"dims": list(args[1])})


@handles(aten.unsqueeze.default)
def _unsqueeze(lo, node, args, kwargs):
    return lo.emit("unsqueeze", [args[0]], {"dim": args[1]})


@handles(aten.squeeze.dim)
def _squeeze(lo, node, args, kwargs):
    return lo.emit("squeeze", [args[0]], {"dim": args[1]})


def _slice_attrs(lo, dim, start, end, step=1):
    rank = len(lo.current.args[0].meta["val"].shape)
    dim = dim % rank
    start = 0 if start is None else start
    end = None if end is None or end == INT64_MAX else end
    return {"dim": dim, "start": start, "end": end, "step": step}


@handles(aten.slice.Tensor)
def _slice(lo, node, args, kwargs):
    full = [*args[1:], *[None] * 4][:4]
    dim, start, end, step = (full[0] or 0), full[1], full[2], (full[3] or 1)
    return lo.emit("slice", [args[0]], _slice_attrs(lo, dim, start, end, step))


@handles(aten.select.int)
def _select(lo, node, args, kwargs):
    return lo.emit("select", [args[0]], {"dim": args[1], "index": args[2]})


@handles(aten.cat.default)
def _cat(lo, node, args, kwargs):
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    return lo.emit("cat", list(args[0]), {"dim": dim})


@handles(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
def _split(lo, node, args, kwargs):
    x = lo.current.args[0].meta["val"]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % x.dim()
    total = x.shape[dim]
    if isinstance(total, torch.SymInt):
        raise lo.fail("split along the token dimension")
    if node.target is aten.chunk.default:
        size = math.ceil(total / args[1])
        sizes = [min(size, total - i) for i in range(0, total, size)]
    elif isinstance(args[1], int):
        sizes = [min(args[1], total - i) for i in range(0, total, args[1])]
    else:
        sizes = list(args[1])
    outs, start = [], 0
    for i, (size, val) in enumerate(zip(sizes, node.meta["val"])):
        attrs = {"dim": dim, "start": start, "end": start + size, "step": 1}
        outs.append(lo.graph.add(
            "slice", [args[0]], shape_of(val), dtype_name(val.dtype), attrs=attrs,
            origin=[f"{node.name}[{i}]@{module_path(node)}"], name=f"{node.name}_{i}",
            order=len(lo.graph)).name)
        start += size
    return outs


@handles(operator.getitem)
def _getitem(lo, node, args, kwargs):
    return args[0][args[1]]


@handles(aten.embedding.default)
def _embedding(lo, node, args, kwargs):
    return lo.emit("embedding", [args[0], args[1]])


@handles(aten.linear.default)
def _linear(lo, node, args, kwargs):
    inputs = [a for a in args[:3] if a is not None]
    return lo.emit("linear", inputs)


@handles(aten.addmm.default)
def _addmm(lo, node, args, kwargs):
    bias, x, w = args[:3]
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
        raise lo.fail("addmm with alpha/beta")
    w_node = lo.graph.node(w)
    w_fx = lo.current.args[2]
    if w_node.op == "weight" and len(w_fx.users) == 1:
        # Conv1D (GPT-2) stores [in, out]; the engine stores it as a linear's [out, in].
        spec = lo.graph.weights[w_node.attrs["name"]]
        spec.recipe = {"t": spec.recipe}
        spec.shape = spec.shape[::-1]
        w_node.shape = spec.shape
        return lo.emit("linear", [x, w, bias])
    mm = lo.emit("matmul", [x, w], val=node.meta["val"])
    return lo.emit("add", [mm, bias])


@handles(aten.mm.default, aten.matmul.default, aten.bmm.default)
def _matmul(lo, node, args, kwargs):
    return lo.emit("matmul", [args[0], args[1]])


@handles(aten.layer_norm.default)
def _layer_norm(lo, node, args, kwargs):
    x, shape, w, b = args[:4]
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    if len(shape) != 1 or w is None:
        raise lo.fail("layer_norm over several dims or without weight")
    return lo.emit("layer_norm", [x, w] + ([b] if b is not None else []), {"eps": eps})


@handles(aten.rms_norm.default)
def _rms_norm(lo, node, args, kwargs):
    x, shape, w = args[:3]
    eps = args[3] if len(args) > 3 else kwargs.get("eps")
    if eps is None:
        eps = torch.finfo(node.meta["val"].dtype).eps
    if len(shape) != 1 or w is None:
        raise lo.fail("rms_norm over several dims or without weight")
    return lo.emit("rms_norm", [x, w], {"eps": eps})


@handles(aten.scaled_dot_product_attention.default)
def _sdpa(lo, node, args, kwargs):
    q, k, v = args[:3]
    params = dict(zip(["attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"], args[3:]))
    params.update(kwargs)
    if params.get("dropout_p", 0.0):
        raise lo.fail("attention dropout")
    mask = _mask_arg(node)
    if mask is not None:
        window = classify_mask(mask)
        lo.masks_folded += 1
    elif params.get("is_causal"):
        window = None
    else:
        raise lo.fail("non-causal attention")
    scale = params.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(node.args[0].meta["val"].shape[-1])
    return lo.emit("sdpa", [q, k, v], {"scale": scale, "window": window})


def lower_aten(traced: Traced, options: Any) -> tuple[Graph, PassReport]:
    """The first pass: torch.export's ATen graph -> the IR graph. `options.weights` is the
    checkpoint's tensors by name; a weight the graph reads that it lacks is refused."""
    before = sum(1 for n in traced.program.graph_module.graph.nodes if n.op == "call_function")
    lowering = Lowering(traced, options.weights.__contains__)
    graph = lowering.run()
    graph.meta["architecture"] = traced.architecture
    report = PassReport("lower_aten", changed=True, stats={
        "aten_ops": before,
        "ir_nodes": len(graph),
        "masks_folded": lowering.masks_folded,
        "mask_ops_removed": sum(lowering.dropped.values()),
        "weights": len(graph.weights),
    })
    report.notes.append(
        f"{lowering.masks_folded} attention masks verified causal on a 37-token probe and folded"
    )
    return graph, report
