"""fuse: pattern fusions, then generic fusion of elementwise chains.

The pass is a list of rules, each a function `graph -> number of rewrites`, applied in order.
A rule can be switched off with `--disable-pass fuse.<rule>` to bisect a bad result. Every
fused node's origin is the union of the nodes it replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llm_engine.builder.ir import Graph, Node, WeightSpec
from llm_engine.builder.passes.report import PassReport
from llm_engine.kernels.ops import OPS


@dataclass(frozen=True)
class Rule:
    name: str
    apply: Callable[[Graph], int]
    doc: str


# ---- matching helpers -----------------------------------------------------------------
def _only_used_by(graph: Graph, name: str, users: set[str]) -> bool:
    return name not in graph.outputs and {u.name for u in graph.users(name)} <= users


def _origin(*nodes: Node) -> list[str]:
    seen: list[str] = []
    for n in nodes:
        seen += [o for o in n.origin if o not in seen]
    return seen


def _scalar(node: Node) -> float | None:
    return node.attrs.get("scalar") if len(node.inputs) == 1 else None


def _strip_cast(graph: Graph, name: str) -> str:
    node = graph.node(name)
    return node.inputs[0] if node.op == "to_dtype" else name


def _replace(graph: Graph, old: Node, new: Node, dead: list[Node]) -> None:
    graph.replace_uses(old.name, new.name)
    for n in [old, *dead]:
        if n.name in graph and not list(graph.g.successors(n.name)) and n.name not in graph.outputs:
            graph.remove(n.name)


# ---- rms_norm: the decomposed HF RMSNorm -> one op -----------------------------------------
def _match_rms(graph: Graph, mul: Node):
    """mul(w, cast?(mul(x, rsqrt(add(mean(pow(x, 2), [-1]), eps))))) -> (x, w, eps, inner)."""
    if mul.op != "mul" or len(mul.inputs) != 2:
        return None
    for w_i in (0, 1):
        w = graph.producer(mul, w_i)
        if w.op != "weight" or len(w.shape) != 1:
            continue
        normed = graph.node(_strip_cast(graph, mul.inputs[1 - w_i]))
        if normed.op != "mul" or len(normed.inputs) != 2:
            continue
        for r_i in (0, 1):
            rsqrt = graph.producer(normed, r_i)
            x = normed.inputs[1 - r_i]
            if rsqrt.op != "rsqrt":
                continue
            add = graph.producer(rsqrt, 0)
            if add.op != "add" or _scalar(add) is None:
                continue
            mean = graph.producer(add, 0)
            if mean.op != "mean" or mean.attrs["dims"] not in ([-1], [len(mean.shape) - 1]):
                continue
            pow_ = graph.producer(mean, 0)
            if pow_.op != "pow" or _scalar(pow_) != 2 or pow_.inputs[0] != x:
                continue
            inner = [normed, rsqrt, add, mean, pow_]
            if mul.inputs[1 - w_i] != normed.name:
                inner.append(graph.node(mul.inputs[1 - w_i]))
            return x, w, float(_scalar(add)), inner
    return None


def fuse_rms_norm(graph: Graph) -> int:
    count = 0
    for node in graph.nodes():
        if node.name not in graph:
            continue
        m = _match_rms(graph, node)
        if m is None:
            continue
        x, w, eps, inner = m
        members = {node.name, *(n.name for n in inner)}
        if not all(_only_used_by(graph, n.name, members) for n in inner):
            continue
        xs = graph.node(x)
        # The op rounds the normalised value to its input's dtype before scaling by w (HF's
        # cast back); fuse only where the graph rounds to that same dtype.
        scaled = graph.node(node.inputs[1] if node.inputs[0] == w.name else node.inputs[0])
        # HF casts to float32 before normalising; the op does that itself.
        src = xs.inputs[0] if xs.op == "to_dtype" and xs.dtype == "float32" and \
            _only_used_by(graph, x, members) and \
            graph.node(xs.inputs[0]).dtype == scaled.dtype else x
        if graph.node(src).dtype != scaled.dtype:
            continue
        if src != x:
            inner.append(xs)
        fused = graph.add("rms_norm", [src, w.name], node.shape, node.dtype,
                          attrs={"eps": eps}, origin=_origin(node, *inner),
                          name=f"rms_norm_{node.name}", order=node.order)
        _replace(graph, node, fused, inner)
        count += 1
    return count


# ---- residual add + norm ---------------------------------------------------------------
def fuse_add_norm(graph: Graph) -> int:
    count = 0
    for node in graph.nodes():
        if node.op not in ("rms_norm", "layer_norm") or node.name not in graph:
            continue
        add = graph.producer(node, 0)
        if add.op != "add" or len(add.inputs) != 2 or add.shape != node.shape:
            continue
        if graph.node(add.inputs[0]).shape != graph.node(add.inputs[1]).shape:
            continue
        op = "add_" + node.op
        fused = graph.add(op, [*add.inputs, *node.inputs[1:]], [node.shape, add.shape],
                          [node.dtype, add.dtype], attrs=dict(node.attrs),
                          origin=_origin(add, node), name=f"{op}_{node.name}", order=node.order)
        normed = graph.add("getitem", [fused.name], node.shape, node.dtype, attrs={"index": 0},
                           origin=node.origin, name=f"{node.name}_out", order=node.order)
        residual = graph.add("getitem", [fused.name], add.shape, add.dtype, attrs={"index": 1},
                             origin=add.origin, name=f"{add.name}_out", order=node.order)
        graph.replace_uses(node.name, normed.name)
        graph.remove(node.name)
        graph.replace_uses(add.name, residual.name)
        graph.remove(add.name)
        count += 1
    return count


# ---- RoPE ------------------------------------------------------------------------------
def _match_rotate_half(graph: Graph, cat: Node) -> str | None:
    """cat([neg(x[..., h:]), x[..., :h]], -1) -> x."""
    if cat.op != "cat" or len(cat.inputs) != 2 or cat.attrs["dim"] not in (-1, len(cat.shape) - 1):
        return None
    neg, lo = graph.producer(cat, 0), graph.producer(cat, 1)
    if neg.op != "neg" or lo.op != "slice":
        return None
    hi = graph.producer(neg, 0)
    if hi.op != "slice" or hi.inputs[0] != lo.inputs[0]:
        return None
    last = len(cat.shape) - 1
    half = cat.shape[-1] // 2
    if (hi.attrs["dim"], hi.attrs["start"], hi.attrs["end"]) != (last, half, None):
        return None
    if (lo.attrs["dim"], lo.attrs["start"], lo.attrs["end"]) != (last, 0, half):
        return None
    return lo.inputs[0]


def fuse_rope(graph: Graph) -> int:
    count = 0
    for node in graph.nodes():
        if node.op != "add" or len(node.inputs) != 2 or node.name not in graph:
            continue
        a, b = graph.producer(node, 0), graph.producer(node, 1)
        for direct, rotated in ((a, b), (b, a)):
            if direct.op != "mul" or rotated.op != "mul" or len(direct.inputs) != 2 \
                    or len(rotated.inputs) != 2:
                continue
            match = None
            for ci in (0, 1):
                for si in (0, 1):
                    cat = graph.producer(rotated, si)
                    x = _match_rotate_half(graph, cat)
                    if x is not None and direct.inputs[ci] == x:
                        match = (x, direct.inputs[1 - ci], rotated.inputs[1 - si], cat)
            if match is None:
                continue
            x, cos, sin, cat = match
            neg = graph.producer(cat, 0)
            inner = [direct, rotated, cat, neg, graph.producer(cat, 1), graph.producer(neg, 0)]
            fused = graph.add("rope", [x, cos, sin], node.shape, node.dtype,
                              origin=_origin(node, *inner), name=f"rope_{node.name}",
                              order=node.order)
            _replace(graph, node, fused, inner)
            count += 1
            break
    return count


def fuse_rope_attention(graph: Graph) -> int:
    """paged_attention(rope(q), rope(k), ...) -> paged_attention(q, k, ..., cos, sin)."""
    count = 0
    for node in graph.nodes():
        if node.op != "paged_attention" or len(node.inputs) != 7:
            continue
        q, k = graph.producer(node, 0), graph.producer(node, 1)
        if q.op != "rope" or k.op != "rope" or q.inputs[1:] != k.inputs[1:]:
            continue
        graph.set_inputs(node, [q.inputs[0], k.inputs[0], *node.inputs[2:], *q.inputs[1:]])
        node.origin = _origin(node, q, k)
        for r in (q, k):
            if not list(graph.g.successors(r.name)):
                graph.remove(r.name)
        count += 1
    return count


# ---- horizontal GEMM fusion: q/k/v, gate/up -----------------------------------------------
def _concat_name(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) - tail > head and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middle = ["+".join(".".join(p[head:len(p) - tail]) for p in parts)]
    return ".".join(parts[0][:head] + middle + parts[0][len(parts[0]) - tail:])


def fuse_linear_concat(graph: Graph) -> int:
    groups: dict[str, list[Node]] = {}
    for node in graph.nodes():
        if node.op == "linear" and graph.producer(node, 1).op == "weight":
            groups.setdefault(node.inputs[0], []).append(node)
    count = 0
    for x, linears in groups.items():
        with_bias = {len(n.inputs) == 3 for n in linears}
        dtypes = {n.dtype for n in linears}
        if len(linears) < 2 or len(with_bias) != 1 or len(dtypes) != 1:
            continue
        if with_bias == {True} and any(graph.producer(n, 2).op != "weight" for n in linears):
            continue
        ws = [graph.weights[graph.producer(n, 1).attrs["name"]] for n in linears]
        if len({w.shape[1] for w in ws}) != 1 or len({w.dtype for w in ws}) != 1:
            continue
        out = sum(w.shape[0] for w in ws)
        w_spec = WeightSpec(_concat_name([w.name for w in ws]), (out, ws[0].shape[1]),
                            ws[0].dtype, {"cat": [w.recipe for w in ws], "dim": 0})
        inputs = [x, graph.add_weight(w_spec).name]
        if with_bias == {True}:
            bs = [graph.weights[graph.producer(n, 2).attrs["name"]] for n in linears]
            b_spec = WeightSpec(_concat_name([b.name for b in bs]), (out,), bs[0].dtype,
                                {"cat": [b.recipe for b in bs], "dim": 0})
            inputs.append(graph.add_weight(b_spec).name)
        first = min(linears, key=lambda n: n.order)
        shape = (*first.shape[:-1], out)
        fused = graph.add("linear", inputs, shape, first.dtype, origin=_origin(*linears),
                          name=f"linear_{'_'.join(n.name for n in linears)}"[:80],
                          order=first.order)
        start = 0
        for n, w in zip(linears, ws):
            part = graph.add("slice", [fused.name], n.shape, n.dtype,
                             attrs={"dim": len(shape) - 1, "start": start,
                                    "end": start + w.shape[0], "step": 1},
                             origin=n.origin, name=f"{n.name}_part", order=n.order)
            graph.replace_uses(n.name, part.name)
            graph.remove(n.name)
            start += w.shape[0]
        count += 1
    graph.dce()
    return count


# ---- gated MLP activation -----------------------------------------------------------------
_GATE_ACTS = {"silu": "silu", "relu": "relu"}


def _act_name(node: Node) -> str | None:
    if node.op in _GATE_ACTS:
        return _GATE_ACTS[node.op]
    if node.op == "gelu":
        return "gelu_tanh" if node.attrs.get("approximate") == "tanh" else "gelu"
    return None


def fuse_gated_act(graph: Graph) -> int:
    """mul(act(y[..., :I]), y[..., I:]) over the halves of one fused gate/up GEMM."""
    count = 0
    for node in graph.nodes():
        if node.op != "mul" or len(node.inputs) != 2 or node.name not in graph:
            continue
        for ai in (0, 1):
            act, up = graph.producer(node, ai), graph.producer(node, 1 - ai)
            name = _act_name(act)
            if name is None or up.op != "slice":
                continue
            gate = graph.producer(act, 0)
            if gate.op != "slice" or gate.inputs[0] != up.inputs[0]:
                continue
            y = graph.producer(gate, 0)
            width = y.shape[-1]
            last = len(y.shape) - 1
            if (gate.attrs["dim"], gate.attrs["start"], gate.attrs["end"]) != (last, 0, width // 2) \
                    or (up.attrs["dim"], up.attrs["start"], up.attrs["end"]) != \
                    (last, width // 2, width) \
                    or gate.attrs.get("step", 1) != 1 or up.attrs.get("step", 1) != 1:
                continue
            members = {node.name, act.name, gate.name, up.name}
            if not all(_only_used_by(graph, n, members) for n in (act.name, gate.name, up.name)):
                continue
            fused = graph.add("gated_act", [y.name], node.shape, node.dtype,
                              attrs={"act": name}, origin=_origin(node, act, gate, up),
                              name=f"gated_{name}_{node.name}", order=node.order)
            _replace(graph, node, fused, [act, gate, up])
            count += 1
            break
    return count


# ---- generic elementwise chains -----------------------------------------------------------
def _elementwise(node: Node) -> bool:
    return OPS[node.op].kind == "elementwise"


def fuse_pointwise(graph: Graph) -> int:
    """Each maximal tree of elementwise ops whose inner values have no outside reader
    becomes one `pointwise` node carrying the tree as an expression."""
    count = 0
    for root in reversed(graph.nodes()):
        if root.name not in graph or not _elementwise(root):
            continue
        members: set[str] = {root.name}
        frontier = [root]
        while frontier:
            n = frontier.pop()
            for i in n.inputs:
                p = graph.node(i)
                if p.name in members or not _elementwise(p):
                    continue
                if _only_used_by(graph, p.name, members):
                    members.add(p.name)
                    frontier.append(p)
        if len(members) < 2:
            continue
        inputs: list[str] = []
        expr = _expr_tree(graph, root.name, members, inputs)
        inner = [graph.node(m) for m in members if m != root.name]
        fused = graph.add("pointwise", inputs, root.shape, root.dtype,
                          attrs={"expr": expr, "dtype": root.dtype},
                          origin=_origin(*sorted(inner, key=lambda n: n.order), root),
                          name=f"pointwise_{root.name}", order=root.order)
        _replace(graph, root, fused, [])
        for m in sorted(inner, key=lambda n: -n.order):
            if m.name in graph and not list(graph.g.successors(m.name)):
                graph.remove(m.name)
        count += 1
    return count


RULES: list[Rule] = [
    Rule("rms_norm", fuse_rms_norm, "decomposed RMSNorm -> rms_norm"),
    Rule("add_norm", fuse_add_norm, "residual add + RMSNorm/LayerNorm -> one op, two outputs"),
    Rule("rope", fuse_rope, "x*cos + rotate_half(x)*sin -> rope"),
    Rule("rope_attention", fuse_rope_attention, "rope(q), rope(k) folded into paged_attention"),
    Rule("linear_concat", fuse_linear_concat, "GEMMs sharing an input (q/k/v, gate/up) -> one"),
    Rule("gated_act", fuse_gated_act, "act(gate) * up -> gated_act"),
    Rule("pointwise", fuse_pointwise, "chains of elementwise ops -> one pointwise kernel"),
]


def fuse(graph: Graph, options=None, *, disabled: frozenset[str] = frozenset(),
         verify_each: Callable[[Graph], None] | None = None) -> tuple[Graph, PassReport]:
    """Apply RULES in order, skipping those in `disabled` and those options.disabled_passes
    names as `fuse.<rule>` (--disable-pass)."""
    disabled = disabled | {p.removeprefix("fuse.") for p in
                           getattr(options, "disabled_passes", None) or ()
                           if p.startswith("fuse.")}
    before = len(graph)
    report = PassReport("fuse")
    for rule in RULES:
        if rule.name in disabled:
            report.notes.append(f"{rule.name}: disabled")
            continue
        n = rule.apply(graph)
        graph.dce()
        if verify_each is not None:
            verify_each(graph)
        report.stats[rule.name] = n
    report.changed = any(isinstance(v, int) and v for v in report.stats.values())
    report.stats["nodes_before"] = before
    report.stats["nodes_after"] = len(graph)
    return graph, report


def _expr_tree(graph: Graph, name: str, members: set[str], inputs: list[str]) -> dict:
    """The fused group below `name` as a pointwise expression; values from outside the group
    become numbered inputs (appended to `inputs` in first-use order)."""
    if name not in members:
        if name not in inputs:
            inputs.append(name)
        return {"in": inputs.index(name)}
    n = graph.node(name)
    args = [_expr_tree(graph, i, members, inputs) for i in n.inputs]
    attrs = {k: v for k, v in n.attrs.items() if k not in ("scalar", "scalar_first")}
    if "scalar" in n.attrs:
        const = {"const": n.attrs["scalar"]}
        args = [const, *args] if n.attrs.get("scalar_first") else [*args, const]
    return {"op": n.op, "args": args, **attrs}
