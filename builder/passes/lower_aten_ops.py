"""The ATen -> IR lowering table: one handler per ATen op, registered with `@handles`.

Kept apart from the walk in lower_aten.py because this is the file that grows: supporting a
new architecture usually means one more handler here and nothing else. A handler gets the
`Lowering` walking the graph (to emit IR nodes), the fx node, and its arguments already
turned into IR (node names, `{"sym": expr}` for SymInts); it returns the IR value(s) the
node becomes, or None for an op that vanishes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING

import sympy
import torch
import torch.fx

from llm_engine.builder.frontend import attention_op, moe_op  # noqa: F401  (register ops)
from llm_engine.builder.passes.lower_aten_mask import classify_mask, mask_arg
from llm_engine.kernels.dtypes import dtype_name

if TYPE_CHECKING:
    from llm_engine.builder.passes.lower_aten import Lowering

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


# ---- the table ----------------------------------------------------------------------------
Handler = Callable[["Lowering", torch.fx.Node, list, dict], str | list[str] | None]
HANDLERS: dict[object, Handler] = {}


def handles(*targets):
    def register(fn: Handler) -> Handler:
        for target in targets:
            HANDLERS[target] = fn
        return fn

    return register


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
          aten.reciprocal: "reciprocal", aten.erf: "erf", aten.floor: "floor",
          aten.log1p: "log1p"}
_BINARY = {aten.add: "add", aten.sub: "sub", aten.mul: "mul", aten.div: "div",
           aten.pow: "pow", aten.maximum: "maximum", aten.minimum: "minimum",
           # in-place forms (the router's `scores /= scores.sum()`): the value is the result,
           # and lower_aten rebinds the mutated tensor to it
           aten.add_: "add", aten.sub_: "sub", aten.mul_: "mul", aten.div_: "div"}


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


@handles(aten.flatten.using_ints, aten.unflatten.int)
def _flatten(lo, node, args, kwargs):
    return lo.emit("reshape", [args[0]], {"shape": [lo.value(s)
                                                    for s in node.meta["val"].shape]})


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


class _Val:
    """Shape and dtype of an intermediate a handler emits (what emit reads of a fake tensor)."""

    def __init__(self, shape, dtype) -> None:
        self.shape, self.dtype = tuple(shape), dtype


@handles(aten.repeat_interleave.self_int)
def _repeat_interleave(lo, node, args, kwargs):
    """x.repeat_interleave(r, dim) (interleaved RoPE: Cohere, GLM) as unsqueeze -> expand ->
    reshape, which every backend already runs."""
    params = dict(zip(["repeats", "dim", "output_size"], args[1:]))
    params.update(kwargs)
    repeats, dim = params.get("repeats"), params.get("dim")
    if dim is None or not isinstance(repeats, int):
        raise lo.fail("repeat_interleave over a flattened tensor or with per-element repeats")
    src = node.args[0].meta["val"]
    d = dim % src.dim()
    shape = list(src.shape)
    wide = [*shape[:d + 1], repeats, *shape[d + 1:]]
    u = lo.emit("unsqueeze", [args[0]], {"dim": d + 1},
                val=_Val([*shape[:d + 1], 1, *shape[d + 1:]], src.dtype))
    e = lo.emit("expand", [u], {"shape": [lo.value(s) for s in wide]},
                val=_Val(wide, src.dtype))
    return lo.emit("reshape", [e], {"shape": [lo.value(s) for s in node.meta["val"].shape]})


@handles(aten.stack.default)
def _stack(lo, node, args, kwargs):
    """stack(xs, dim) as cat of unsqueezed xs (interleaved rotate_half: Cohere)."""
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    out = node.meta["val"]
    d = dim % out.dim()
    parts = []
    for x, fx_x in zip(args[0], node.args[0]):
        val = fx_x.meta["val"]
        shape = list(val.shape)
        parts.append(lo.emit("unsqueeze", [x], {"dim": d},
                             val=_Val([*shape[:d], 1, *shape[d:]], val.dtype)))
    return lo.emit("cat", parts, {"dim": d})


@handles(aten.cat.default, aten.concat.default)
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


ATTENTION_OPS = (aten.scaled_dot_product_attention.default,
                 torch.ops.llm_engine.attention.default)


def _window(lo, node) -> int | None:
    """The sliding window the attention's mask encodes (None: plainly causal)."""
    mask = mask_arg(node)
    if mask is None:
        raise lo.fail("attention without a causal mask")
    window = classify_mask(mask)
    lo.masks_folded += 1
    return window


@handles(torch.ops.llm_engine.attention.default)
def _attention(lo, node, args, kwargs):
    """The engine's own attention op (builder/frontend/attention_op.py): its variant is in
    its arguments."""
    q, k, v, _, sinks, scale, softcap = args[:7]
    # an eager attention recognised by lower_aten_eager: its mask is already classified
    variant = node.meta.get("llm_engine_variant")
    if variant is not None:
        lo.masks_folded += 1
    window = variant["window"] if variant is not None else _window(lo, node)
    attrs = {"scale": float(scale), "window": window}
    if softcap:
        attrs["softcap"] = float(softcap)
    if variant is not None and variant["alibi"]:
        attrs["alibi"] = variant["alibi"]  # per-head slopes
    # sinks (gpt-oss): one learned logit per head, a weight until kv_cache reads its values
    return lo.emit("sdpa", [q, k, v, *([sinks] if sinks is not None else [])], attrs)


@handles(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(lo, node, args, kwargs):
    """An arange of fixed bounds (long-context RoPE's frequency index) is a constant.
    arange(T), the index of each token, is its position: the model is traced without a
    cache, where `arange(T) + past_seen_tokens` (Llama 4's attention temperature) is
    arange(T); in a flat paged batch each token's position is in `position_ids`."""
    if any(not isinstance(a, int | float) for a in args):
        bounds = [a for a in args if not (isinstance(a, int) and a == 0)]
        if len(args) <= 2 and bounds == [{"sym": "T"}]:
            pos = next(n for n in lo.graph.inputs
                       if lo.graph.node(n).attrs.get("name") == "position_ids")
            flat = lo.emit("reshape", [pos], {"shape": [{"sym": "T"}]})
            dtype = dtype_name(node.meta["val"].dtype)
            return flat if dtype == "int64" else lo.emit("to_dtype", [flat], {"dtype": dtype})
        raise lo.fail("arange with a size known only at run time")
    val = node.meta["val"]
    return lo.literal(torch.arange(*args, dtype=val.dtype))


@handles(aten.new_empty.default, aten.empty.memory_format, aten.zeros_like.default,
         aten.new_zeros.default, aten.empty_like.default)
def _fresh(lo, node, args, kwargs):
    """A tensor whose values do not matter or are zero (empty / zeros_like): a zero literal
    expanded, which costs no buffer."""
    val = node.meta["val"]
    one = lo.literal(torch.zeros([1] * val.dim(), dtype=val.dtype))
    return lo.emit("expand", [one], {"shape": [lo.value(s) for s in val.shape]})


@handles(aten.copy.default)
def _copy(lo, node, args, kwargs):
    """The functional copy_: src in dst's dtype and shape."""
    dst, src = node.args[0].meta["val"], node.args[1].meta["val"]
    out = args[1]
    if src.dtype != dst.dtype:
        out = lo.emit("to_dtype", [out], {"dtype": dtype_name(dst.dtype)},
                      val=_Val(src.shape, dst.dtype))
    if tuple(src.shape) != tuple(dst.shape):
        out = lo.emit("expand", [out], {"shape": [lo.value(s) for s in dst.shape]})
    return out


@handles(aten.slice_scatter.default)
def _slice_scatter(lo, node, args, kwargs):
    """base with src over [start:end) of dim, as the concatenation of base's other parts
    and src (step 1); parts of size 0 are left out."""
    params = dict(zip(["dim", "start", "end", "step"], args[2:]))
    params.update(kwargs)
    dim, start, end = params.get("dim", 0), params.get("start"), params.get("end")
    if params.get("step", 1) != 1:
        raise lo.fail("slice_scatter with a step")
    base = node.args[0].meta["val"]
    d = dim % base.dim()
    size = base.shape[d]
    start = 0 if start is None else start
    end = size if end is None or (isinstance(end, int) and end >= INT64_MAX) else end
    if not all(isinstance(x, int) for x in (start, end, size)):
        raise lo.fail("slice_scatter over a dimension of run-time size")
    end = min(end, size)
    parts = []
    shape = list(base.shape)
    if start > 0:
        parts.append(lo.emit("slice", [args[0]], _slice_attrs(lo, d, 0, start, 1),
                             val=_Val([*shape[:d], start, *shape[d + 1:]], base.dtype)))
    parts.append(args[1])
    if end < size:
        parts.append(lo.emit("slice", [args[0]], _slice_attrs(lo, d, end, size, 1),
                             val=_Val([*shape[:d], size - end, *shape[d + 1:]], base.dtype)))
    return parts[0] if len(parts) == 1 else lo.emit("cat", parts, {"dim": d})


@handles(aten.scatter.value)
def _scatter(lo, node, args, kwargs):
    x, dim, index, value = args[:4]
    return lo.emit("scatter", [x, index], {"dim": dim, "value": float(value)})


@handles(aten.masked_fill.Scalar)
def _masked_fill(lo, node, args, kwargs):
    return lo.emit("masked_fill", [args[0], args[1]], {"value": float(args[2])})


@handles(aten.bitwise_not.default, aten.logical_not.default)
def _not(lo, node, args, kwargs):
    if node.meta["val"].dtype != torch.bool:
        raise lo.fail("bitwise_not of integers")
    return lo.emit("logical_not", [args[0]])


_COMPARE = {aten.gt: "gt", aten.ge: "ge", aten.lt: "lt", aten.le: "le", aten.eq: "eq",
            aten.ne: "ne"}


def _compare(lo, node, args, kwargs):
    op = _COMPARE[node.target.overloadpacket]
    a, b = args[0], args[1]
    if isinstance(b, dict) or isinstance(a, dict):
        raise lo.fail(f"{op} with a symbolic scalar")
    if lo.is_tensor(b):
        return lo.emit("compare", [a, b], {"op": op})
    return lo.emit("compare", [a], {"op": op, "scalar": float(b)})


for _packet in _COMPARE:
    handles(_packet)(_compare)


@handles(aten.max.dim, aten.min.dim)
def _max_dim(lo, node, args, kwargs):
    """max(x, dim) -> (values, indices) as top-1 (the router's argmax)."""
    dim = args[1]
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    src = node.args[0].meta["val"]
    d = dim % src.dim()
    kept = [*src.shape[:d], 1, *src.shape[d + 1:]]
    vals, idx = _top_k(lo, args[0], 1, d, node.target is aten.max.dim,
                       _Val(kept, src.dtype), _Val(kept, torch.int64))
    if keepdim:
        return [vals, idx]
    values, indices = node.meta["val"]
    return [lo.emit("squeeze", [vals], {"dim": d}, val=values),
            lo.emit("squeeze", [idx], {"dim": d}, val=indices)]


@handles(aten.clamp.Tensor, aten.clamp_min.Tensor, aten.clamp_max.Tensor)
def _clamp_tensor(lo, node, args, kwargs):
    """clamp by tensors: maximum / minimum."""
    x = args[0]
    if node.target is aten.clamp.Tensor:
        lo_, hi = [*args[1:], None, None][:2]
        lo_, hi = kwargs.get("min", lo_), kwargs.get("max", hi)
    elif node.target is aten.clamp_min.Tensor:
        lo_, hi = args[1], None
    else:
        lo_, hi = None, args[1]
    if lo_ is not None:
        x = lo.emit("maximum", [x, lo_])
    if hi is not None:
        x = lo.emit("minimum", [x, hi])
    return x


@handles(aten.gather.default)
def _gather(lo, node, args, kwargs):
    return lo.emit("gather", [args[0], args[2]], {"dim": args[1]})


@handles(torch.ops.llm_engine.moe.default)
def _moe(lo, node, args, kwargs):
    """The experts of a MoE block (builder/frontend/moe_op.py); the router traced before."""
    x, index, weights, gate_up, down, gate_up_bias, down_bias, act, alpha, limit = args[:10]
    if (gate_up_bias is None) != (down_bias is None):
        raise lo.fail("experts with a bias on one projection only")
    attrs = {"act": act}
    if act == "clamped_swiglu":
        attrs |= {"alpha": float(alpha), "limit": float(limit)}
    biases = [b for b in (gate_up_bias, down_bias) if b is not None]
    return lo.emit("moe", [x, index, weights, gate_up, down, *biases], attrs)


@handles(aten.topk.default)
def _topk(lo, node, args, kwargs):
    """topk -> (gather(x, idx), idx): the indices are the op; the values are read back."""
    params = dict(zip(["k", "dim", "largest", "sorted"], args[1:]))
    params.update(kwargs)
    k, dim = params["k"], params.get("dim", -1)
    if not isinstance(k, int):
        raise lo.fail("topk with a symbolic k")
    values, indices = node.meta["val"]
    return list(_top_k(lo, args[0], k, dim, bool(params.get("largest", True)), values,
                       indices))


def _top_k(lo, x, k: int, dim: int, largest: bool, values, indices) -> tuple[str, str]:
    """(values, indices) of top-k as the IR has it: `topk` gives the indices and `gather`
    reads their values back (`values`, `indices`: their shapes and dtypes)."""
    idx = lo.emit("topk", [x], {"k": k, "dim": dim, "largest": largest}, val=indices)
    return lo.emit("gather", [x, idx], {"dim": dim}, val=values), idx


@handles(aten.scaled_dot_product_attention.default)
def _sdpa(lo, node, args, kwargs):
    q, k, v = args[:3]
    params = dict(zip(["attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"], args[3:]))
    params.update(kwargs)
    if params.get("dropout_p", 0.0):
        raise lo.fail("attention dropout")
    if mask_arg(node) is not None:
        window = _window(lo, node)
    elif params.get("is_causal"):
        window = None
    else:
        raise lo.fail("non-causal attention")
    scale = params.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(node.args[0].meta["val"].shape[-1])
    return lo.emit("sdpa", [q, k, v], {"scale": scale, "window": window})
