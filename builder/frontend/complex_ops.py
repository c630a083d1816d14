"""Rewrite the complex-number ops of a traced program into real ops.

Llama 4's RoPE rotates query / key pairs as complex numbers: `torch.polar` builds the
rotation, `view_as_complex` pairs up the last dimension, a complex multiply rotates and
`view_as_real` unpairs. The IR has no complex dtype, so each complex tensor of shape S is
carried as the real tensor of shape S + [2] (its `view_as_real`), and the few ops seen on
complex tensors are rewritten on that form. A program with any other op on a complex tensor
is left as it is (lower_aten then names the op).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

aten = torch.ops.aten

_PASS_THROUGH = frozenset({aten.to.dtype_layout, aten.to.dtype, aten._to_copy.default,
                           aten.clone.default, aten.alias.default})


def _complex(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_complex()


def _rewritable(graph: torch.fx.Graph) -> bool:
    for node in graph.nodes:
        if node.op != "call_function" or not (_complex(node) or any(map(_complex, node.args))):
            continue
        t = node.target
        if t in (aten.polar.default, aten.view_as_complex.default, aten.view_as_real.default,
                 aten._assert_tensor_metadata.default, aten.unsqueeze.default) or \
                t in _PASS_THROUGH:
            continue
        if t is aten.mul.Tensor and all(_complex(a) or isinstance(a, (int, float))
                                        for a in node.args):
            continue
        return False
    return True


def realify_complex(gm: torch.fx.GraphModule) -> int:
    """Rewrite the graph's complex ops in place; the number of ops rewritten."""
    graph = gm.graph
    if not any(_complex(n) for n in graph.nodes) or not _rewritable(graph):
        return 0
    real: dict[torch.fx.Node, torch.fx.Node] = {}  # complex node -> its [..., 2] real form
    done = 0

    def call(target, *args):
        return graph.call_function(target, args)

    def parts(z):
        return call(aten.select.int, z, -1, 0), call(aten.select.int, z, -1, 1)

    for node in list(graph.nodes):
        if node.op != "call_function" or not (_complex(node) or any(map(_complex, node.args))):
            continue
        t = node.target
        with graph.inserting_before(node):
            if t is aten._assert_tensor_metadata.default:
                graph.erase_node(node)
                continue
            if t is aten.view_as_real.default:
                node.replace_all_uses_with(real[node.args[0]])
                graph.erase_node(node)
                done += 1
                continue
            if t is aten.view_as_complex.default:
                out = node.args[0]
            elif t is aten.polar.default:
                mag, ang = node.args
                cos, sin = call(aten.cos.default, ang), call(aten.sin.default, ang)
                if not (isinstance(mag, torch.fx.Node) and mag.target is aten.ones_like.default):
                    cos, sin = call(aten.mul.Tensor, mag, cos), call(aten.mul.Tensor, mag, sin)
                out = call(aten.stack.default, [cos, sin], -1)
            elif t in _PASS_THROUGH:
                out = real[node.args[0]]
            elif t is aten.unsqueeze.default:
                dim = node.args[1]
                out = call(aten.unsqueeze.default, real[node.args[0]], dim - 1 if dim < 0 else dim)
            elif t is aten.mul.Tensor and not all(map(_complex, node.args)):
                z, s = node.args if _complex(node.args[0]) else node.args[::-1]
                out = call(aten.mul.Tensor, real[z], s)
            else:  # complex * complex
                a, b = parts(real[node.args[0]])
                c, d = parts(real[node.args[1]])
                re = call(aten.sub.Tensor, call(aten.mul.Tensor, a, c), call(aten.mul.Tensor, b, d))
                im = call(aten.add.Tensor, call(aten.mul.Tensor, a, d), call(aten.mul.Tensor, b, c))
                out = call(aten.stack.default, [re, im], -1)
        real[node] = out
        done += 1
    for node in reversed(list(graph.nodes)):
        if (node in real or node.target is aten.ones_like.default) and not node.users:
            graph.erase_node(node)
    _fake_propagate(gm)
    return done


def _fake_propagate(gm: torch.fx.GraphModule) -> None:
    """meta["val"] for the nodes the rewrite made, from their inputs' fake values."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or "val" in node.meta:
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
        node.meta["val"] = node.target(*args, **kwargs)
        src = next((a for a in node.all_input_nodes if "stack_trace" in a.meta), None)
        if src is not None:
            for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                if key in src.meta:
                    node.meta.setdefault(key, src.meta[key])


def scatter_topk_as_mask(gm: torch.fx.GraphModule) -> int:
    """`full_like(x, v).scatter(d, i, topk(x)[0])` with `i = topk(x)[1]` (Llama 4's router:
    the top-k logits kept, the rest -inf) as `masked_fill(x, scatter(0, d, i, 1) == 0, v)`:
    the IR's scatter writes a scalar, not a tensor. The number rewritten."""
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        if node.target is not aten.scatter.src:
            continue
        full, dim, index, src = node.args
        if not (isinstance(full, torch.fx.Node) and full.target is aten.full_like.default and
                src.target is operator.getitem and index.target is operator.getitem and
                src.args == (index.args[0], 0) and index.args[1] == 1 and
                index.args[0].target is aten.topk.default and
                index.args[0].args[0] is full.args[0] and
                (index.args[0].args[2:3] or [-1])[0] in (dim, dim - full.meta["val"].dim())):
            continue
        x, fill = full.args[0], full.args[1]
        with graph.inserting_before(node):
            zero = graph.call_function(aten.zeros_like.default, (x,))
            hit = graph.call_function(aten.scatter.value, (zero, dim, index, 1.0))
            miss = graph.call_function(aten.eq.Scalar, (hit, 0))
            out = graph.call_function(aten.masked_fill.Scalar, (x, miss, fill))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        if not full.users:
            graph.erase_node(full)
        done += 1
    if done:
        _fake_propagate(gm)
    return done


def repeat_as_expand(gm: torch.fx.GraphModule) -> int:
    """`x.repeat(r)` (Llama 4's dense experts) as a reshape to [1, s0, 1, s1, ...], an expand
    to [r0, s0, r1, s1, ...] and a reshape to [r0*s0, r1*s1, ...]. The number rewritten."""
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        if node.target is not aten.repeat.default:
            continue
        x, reps = node.args
        shape = list(x.meta["val"].shape)
        shape = [1] * (len(reps) - len(shape)) + shape
        with graph.inserting_before(node):
            sizes = [graph.call_function(aten.sym_size.int, (x, i - (len(reps) - x.meta["val"].dim())))
                     if not isinstance(s, int) else s for i, s in enumerate(shape)]
            split = [v for s in sizes for v in (1, s)]
            wide = [v for r, s in zip(reps, sizes, strict=True) for v in (r, s)]
            out = graph.call_function(aten.reshape.default, (x, split))
            out = graph.call_function(aten.expand.default, (out, wide))
            if sum(not isinstance(s, int) for s in sizes) > 1:
                raise NotImplementedError("repeat of a tensor with two dynamic sizes")
            flat = [r * s if isinstance(s, int) else -1 for r, s in zip(reps, sizes, strict=True)]
            out = graph.call_function(aten.reshape.default, (out, flat))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    if done:
        _fake_propagate(gm)
    return done
