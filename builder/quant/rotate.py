"""Rotate the model before quantizing it (`engine build --quant MODE --rotation ...`).

An orthogonal Q changes nothing a transformer computes when it is folded into the weights on
both sides of a value, yet it spreads each outlier channel of that value over all channels,
which is what per-channel and per-token quantizers cannot represent (QuaRot, SpinQuant, QuIP#).
Three rotations, each found in the graph and applied only where the graph has the shape that
makes it exact:

- residual  The residual stream x -> x Q (Q a randomized Hadamard of the hidden size). An RMS
            norm commutes with Q once its weight g is folded into the GEMMs after it
            (W diag(g) Q); the GEMMs that add into the stream (o_proj, down) get Qᵀ W, the
            embedding table E Q. A tied LM head reads E Q too, so one 576 x 576 GEMM,
            Qᵀ diag(g) Q, runs on the sampled rows only, before the head. Needs RMS norms
            (LayerNorm's mean subtraction does not commute with Q).
- heads     V -> V R per KV head and o_proj's columns per query head W R (R of head_dim):
            attention mixes rows of V, so R passes through it. No added op.
- mlp       (online) the down projection's input is rotated at run time by a block-diagonal
            Hadamard (blocks of up to 128 channels: a [.., K/b, b] GEMM, ~b/N of down's
            cost), and down's columns by the same. The activation after the gated
            nonlinearity has the heaviest tails in the model, and no weight can absorb a
            rotation there.

The pass runs before calibration, so the statistics, scales and Hessians all see the rotated
model; the rotated graph computes the same logits (to rounding), which the tests check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llm_engine.builder.ir import Graph, Node
from llm_engine.builder.quant.calibrate import linear_inputs
from llm_engine.builder.quant.hadamard import rotation_matrix
from llm_engine.builder.quant.patterns import (
    LAYOUT_OPS,
    attention_v_rows,
    dense_weight_names,
    only_user,
)

ROTATIONS = ("none", "offline", "online")
MLP_BLOCK = 128
WEIGHT_PREFIX = "rotation."


def is_rotation_linear(graph: Graph, node: Node) -> bool:
    """A GEMM this pass added (kept in high precision by the quantizer)."""
    w = graph.producer(node, 1)
    return w.op == "weight" and w.attrs["name"].startswith(WEIGHT_PREFIX)


@dataclass
class _Stream:
    table: Node  # the embedding table's weight node
    writers: list[Node] = field(default_factory=list)  # linears whose output adds into x
    norms: list[tuple[Node, int, list[Node]]] = field(default_factory=list)  # norm, g index, readers
    tied_heads: list[Node] = field(default_factory=list)  # readers of the embedding table


def _readers(graph: Graph, value: str) -> list[Node] | None:
    """The linears reading a normed value, directly or through a row selection (the sampled
    rows before the LM head), or None if anything else reads it."""
    out = []
    for u in graph.users(value):
        if u.op == "linear" and u.inputs[0] == value and u.inputs[1:2]:
            out.append(u)
        elif u.op == "index_select" and u.attrs.get("dim") not in (-1, len(u.shape) - 1):
            deeper = _readers(graph, u.name)
            if deeper is None:
                return None
            out += deeper
        else:
            return None
    return out


def find_stream(graph: Graph) -> tuple[_Stream | None, str]:
    """The residual stream's structure, or (None, why not)."""
    embs = [n for n in graph.nodes() if n.op == "embedding"]
    if len(embs) != 1 or embs[0].attrs.get("b_format", "dense") != "dense":
        return None, "not exactly one dense embedding"
    emb = embs[0]
    stream = _Stream(graph.node(emb.inputs[0]))
    members, frontier, seen = {emb.name}, [emb.name], set()
    normed: list[tuple[Node, int, str]] = []
    while frontier:
        v = frontier.pop()
        for u in graph.users(v):
            if u.op == "rms_norm" and u.inputs[0] == v:
                normed.append((u, 1, u.name))
            elif u.op == "add_rms_norm" and v in u.inputs[:2] and u.name not in seen:
                seen.add(u.name)
                other = graph.node(u.inputs[1] if u.inputs[0] == v else u.inputs[0])
                if other.name in members or dense_weight_names(graph, other) is None \
                        or not only_user(graph, other.name, u.name):
                    return None, f"{other.name} adds into the residual stream and is not a " \
                                 "dense GEMM of its own"
                stream.writers.append(other)
                for gi in graph.users(u.name):
                    if gi.op != "getitem":
                        return None, f"{gi.name} reads {u.name} whole"
                    if gi.attrs["index"] == 1:
                        members.add(gi.name)
                        frontier.append(gi.name)
                    else:
                        normed.append((u, 2, gi.name))
            else:
                return None, f"{u.name} ({u.op}) reads the residual stream"
    for norm, g_i, value in normed:
        readers = _readers(graph, value)
        if readers is None or len(norm.inputs) <= g_i:
            return None, f"{value} is read by something other than GEMMs"
        g = graph.node(norm.inputs[g_i])
        if g.op != "weight" or not only_user(graph, g.name, norm.name):
            return None, f"{norm.name}'s weight is shared or computed"
        for r in readers:
            w = graph.producer(r, 1)
            if w.name == stream.table.name:
                stream.tied_heads.append(r)
            elif w.op != "weight" or not only_user(graph, w.name, r.name) or \
                    r.attrs.get("b_format", "dense") != "dense":
                return None, f"{r.name}'s weight is shared or not dense"
        stream.norms.append((norm, g_i, readers))
    table_users = {u.name for u in graph.users(stream.table.name)}
    if table_users != {emb.name, *(h.name for h in stream.tied_heads)}:
        return None, "the embedding table has other readers"
    return stream, ""


def _f64(w, name: str) -> torch.Tensor:
    return w.values[name].to(torch.float64)


def _rotate_stream(graph: Graph, w, stream: _Stream, Q: torch.Tensor) -> int:
    table = stream.table.attrs["name"]
    w.set(table, _f64(w, table) @ Q)
    for writer in stream.writers:
        names = dense_weight_names(graph, writer)
        w.set(names[0], Q.T @ _f64(w, names[0]))
        for bias in names[1:]:
            w.set(bias, _f64(w, bias) @ Q)
    added, tied = 0, {h.name for h in stream.tied_heads}
    for norm, g_i, readers in stream.norms:
        g_name = graph.node(norm.inputs[g_i]).attrs["name"]
        g = _f64(w, g_name)
        for r in readers:
            if r.name in tied:
                # logits = n(x) diag(g) Eᵀ = n(xQ) (Qᵀ diag(g) Q) (EQ)ᵀ: one small GEMM on the
                # sampled rows keeps the table shared by the embedding and the head.
                m = w.add(f"{WEIGHT_PREFIX}head.{r.name}",
                          ((Q.T * g) @ Q).to(w.values[table].dtype), ["rotation"])
                x = graph.node(r.inputs[0])
                lin = graph.add("linear", [x.name, m.name], x.shape, x.dtype,
                                origin=["rotation"], name=f"rotate_{r.name}")
                graph.set_inputs(r, [lin.name, *r.inputs[1:]])
                added += 1
            else:
                name = graph.producer(r, 1).attrs["name"]
                w.set(name, (_f64(w, name) * g) @ Q)
        w.set(g_name, torch.ones_like(g))
    return added


def _rotate_heads(graph: Graph, w, seed: int) -> int:
    done, matrices = 0, {}
    for act, readers in linear_inputs(graph).items():
        node = graph.node(act)
        if node.op not in LAYOUT_OPS:
            continue
        found = attention_v_rows(graph, node)
        outs = [dense_weight_names(graph, graph.node(r)) for r in readers]
        if found is None or any(o is None for o in outs):
            continue
        d, kv = found.head_dim, found.kv_heads
        if d not in matrices:  # one R per head size, shared by every layer
            matrices[d] = rotation_matrix(d, seed)[0]
        R = matrices[d]
        for name in found.names:  # V's rows per KV head: Rᵀ W_j, bias b_j R
            t = _f64(w, name).clone()
            block = t[found.start:found.end]
            if t.dim() == 2:
                t[found.start:found.end] = (R.T @ block.reshape(kv, d, -1)).reshape(block.shape)
            else:
                t[found.start:found.end] = (block.reshape(kv, d) @ R).reshape(-1)
            w.set(name, t)
        for names in outs:  # o_proj's columns per query head: W_h R
            W = _f64(w, names[0])
            w.set(names[0], (W.reshape(W.shape[0], found.heads, d) @ R).reshape(W.shape))
        done += 1
    return done


def _block(K: int) -> int:
    b = 1
    while K % (b * 2) == 0 and b * 2 <= MLP_BLOCK:
        b *= 2
    return b


def _sym(shape) -> list:
    return [{"sym": s} if isinstance(s, str) else s for s in shape]


def _rotate_mlp(graph: Graph, w, seed: int) -> tuple[int, int | None]:
    """Online block Hadamard before every down projection fed by a gated activation."""
    done, block, weights = 0, None, {}
    for node in graph.nodes():
        if node.op != "linear" or not node.inputs:
            continue
        act = graph.node(node.inputs[0])
        if act.op != "gated_act" or not only_user(graph, act.name, node.name):
            continue
        names = dense_weight_names(graph, node)
        if names is None:
            continue
        K = graph.producer(node, 1).shape[1]
        b = _block(K)
        if b < 16 or not isinstance(act.shape, tuple) or act.shape[-1] != K:
            continue
        if b not in weights:
            R, _ = rotation_matrix(b, seed)
            weights[b] = (R, w.add(f"{WEIGHT_PREFIX}mlp{b}", R.T.to(w.values[names[0]].dtype),
                                   ["rotation"]))
        R, wnode = weights[b]
        shape4 = (*act.shape[:-1], K // b, b)
        split = graph.add("reshape", [act.name], shape4, act.dtype,
                          attrs={"shape": _sym(shape4)}, origin=node.origin)
        rot = graph.add("linear", [split.name, wnode.name], shape4, act.dtype,
                        origin=node.origin)
        back = graph.add("reshape", [rot.name], act.shape, act.dtype,
                         attrs={"shape": _sym(act.shape)}, origin=node.origin)
        graph.set_inputs(node, [back.name, *node.inputs[1:]])
        W = _f64(w, names[0])  # columns by blocks: W blockdiag(R)
        w.set(names[0], (W.reshape(W.shape[0], K // b, b) @ R).reshape(W.shape))
        done, block = done + 1, b
    return done, block


def rotate(graph: Graph, w, kind: str, seed: int = 0) -> dict[str, Any]:
    """Apply the rotations of `kind` ("offline": residual and heads; "online": also mlp) to the
    graph and its weight values `w` (builder.quant.folds.Weights); returns the report."""
    report: dict[str, Any] = {"kind": kind, "residual": None, "heads": 0, "mlp": 0, "notes": []}
    if kind == "none":
        return report
    stream, why = find_stream(graph)
    if stream is None:
        report["notes"].append(f"residual stream not rotated: {why}")
    else:
        H = stream.table.shape[1]
        Q, qkind = rotation_matrix(H, seed)
        added = _rotate_stream(graph, w, stream, Q)
        report["residual"] = {"size": H, "matrix": qkind, "writers": len(stream.writers),
                              "norms": len(stream.norms), "head_gemms_added": added}
    report["heads"] = _rotate_heads(graph, w, seed + 1)
    if kind == "online":
        report["mlp"], report["mlp_block"] = _rotate_mlp(graph, w, seed + 2)
    return report
