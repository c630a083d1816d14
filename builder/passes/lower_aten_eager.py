"""Eager attention -> the engine's attention op, for models that compute attention in their own
code instead of calling transformers' AttentionInterface (MPT, whose scores carry ALiBi).

Why recognise the pattern rather than patch the model: patching MptAttention.forward at trace
time would be a copy of MPT's code (its fused Wqkv, clip_qkv, bias slicing), to be kept in
step with every transformers release. The traced graph already says what the model computes;
this pass only has to prove it is attention with a known variant.

The structure matched is `matmul(q, transpose(k)) -> elementwise ops -> softmax(-1) -> casts /
dropout -> matmul(., v)`. What the elementwise ops between the scores S and the softmax do is
not read from their code (it differs between versions: a scale, an ALiBi table sliced by the
key length, masked_fill or an additive mask) but decided by running them, as lower_aten_mask
does for masks: on a probe of t tokens the chain is evaluated at S = 0, X and 2X. It must be
f(S) = scale * S + bias[h, i, j] on the keys it lets through, with one positive scale, a causal
or sliding-window mask, and a bias that is either zero or ALiBi: slopes[h] * (j - i) plus a
constant per query row (softmax ignores those; MPT's bias is slopes[h] * (j - (S - 1))).
Anything else fails the build in one line naming the module. The matched attention becomes one
`llm_engine::attention` node whose `llm_engine_variant` meta (window, ALiBi slopes) the
attention handler of lower_aten_ops reads; the replaced ops are left dead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from llm_engine.builder.errors import BuildError
from llm_engine.builder.frontend.trace import Traced
from llm_engine.builder.passes.lower_aten_mask import classify_allowed, evaluate
from llm_engine.builder.passes.lower_aten_ops import module_path

aten = torch.ops.aten

VARIANT = "llm_engine_variant"  # fx node meta read by lower_aten_ops._attention
_SOFTMAX = (aten.softmax.int, aten._softmax.default)
# between softmax and the value matmul: ops that leave the probabilities as they are
_PROBS_PASS = (aten.to.dtype, aten._to_copy.default, aten.dropout.default, aten.alias.default,
               aten.clone.default, aten.contiguous.default, aten.type_as.default)
# between the scores and softmax: elementwise ops, whose effect the probes measure
_SCORE_OPS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
              aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
              aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
              *_PROBS_PASS)
_SCALE_OPS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
_PROBES = (37, 23)  # token counts the chain is evaluated at (two: the bias may not depend on T)
_X = 1024.0  # the probe's score: large, so scale * X is not lost next to the bias


@dataclass
class EagerAttention:
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    scores: torch.fx.Node  # matmul(q, k^T)
    logits: torch.fx.Node  # softmax's input
    out: torch.fx.Node  # matmul(probs, v)


def rewrite_eager_attention(traced: Traced) -> int:
    """Replace each eager attention of the traced graph by the engine's op; returns how many."""
    gm = traced.program.graph_module
    found = [m for n in list(gm.graph.nodes) if (m := _match(n, traced.architecture))]
    for m in found:
        _replace(m, _variant(m, traced))
    if found:
        gm.graph.lint()
        gm.recompile()
    return len(found)


# ---- matching ------------------------------------------------------------------------------
def _users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """node's readers, not counting export's metadata assertions."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _match(node: torch.fx.Node, arch: str) -> EagerAttention | None:
    if node.op != "call_function" or node.target not in _SOFTMAX:
        return None
    val = node.meta.get("val")
    if val is None or val.dim() != 4 or node.args[1] not in (-1, 3):
        return None
    out = _value_matmul(node)
    if out is None:
        return None
    scores = node.args[0]
    while isinstance(scores, torch.fx.Node) and scores.target in _SCORE_OPS:
        scores = scores.args[0]
    if not (isinstance(scores, torch.fx.Node) and scores.target is aten.matmul.default):
        raise _fail(node, arch, f"its softmax reads {_name(scores)}, not scores "
                                "matmul(q, k^T) through elementwise ops")
    q, kt = scores.args
    if kt.target is not aten.transpose.int or {d % 4 for d in kt.args[1:]} != {2, 3}:
        raise _fail(node, arch, f"its keys enter the scores through {_name(kt)}, not a "
                                "transpose of the last two dims")
    return EagerAttention(q, kt.args[0], out.args[1], scores, node.args[0], out)


def _value_matmul(softmax: torch.fx.Node) -> torch.fx.Node | None:
    """matmul(probs, v) when softmax's only reader is one, through casts and dropout."""
    node = softmax
    while len(users := _users(node)) == 1 and users[0].target in _PROBS_PASS:
        node = users[0]
    if len(users) != 1 or users[0].target is not aten.matmul.default or \
            users[0].args[0] is not node:
        return None
    return users[0]


def _name(node) -> str:
    return str(node.target) if isinstance(node, torch.fx.Node) else repr(node)


def _fail(node: torch.fx.Node, arch: str, why: str) -> BuildError:
    return BuildError(f"attention in module {module_path(node)} of {arch}: {why}; no lowering "
                      "exists; file an issue with the model name")


# ---- deciding the variant by running the scores' ops ----------------------------------------
def _variant(m: EagerAttention, traced: Traced) -> dict:
    heads = m.scores.meta["val"].shape[1]
    if not isinstance(heads, int):
        raise _fail(m.logits, traced.architecture, "a head count known only at run time")
    fits = [_fit(m, traced, heads, t) for t in _PROBES]
    (window, scale, slopes), (window2, scale2, slopes2) = fits
    if window != window2 or not math.isclose(scale, scale2, rel_tol=1e-5) or \
            (slopes is None) != (slopes2 is None) or \
            (slopes is not None and not torch.allclose(slopes, slopes2, rtol=1e-5, atol=1e-7)):
        raise _fail(m.logits, traced.architecture,
                    "its score scale, mask or position bias changes with the token count")
    return {"window": window, "scale": _exact_scale(m, scale),
            "alibi": None if slopes is None else [float(s) for s in slopes]}


def _fit(m: EagerAttention, traced: Traced, heads: int, t: int
         ) -> tuple[int | None, float, torch.Tensor | None]:
    """(window, scale, ALiBi slopes or None) of the score chain on a probe of t tokens."""
    arch = traced.architecture
    f = [_probe(m, traced, heads, t, x) for x in (0.0, _X, 2 * _X)]
    bias = f[0]
    # masked keys get -inf or about a dtype's lowest value (fp16's is -65504); an ALiBi bias
    # on a probe this short is a few units
    allowed = torch.isfinite(bias) & (bias > torch.finfo(torch.float16).min / 2)
    if not torch.equal(allowed, allowed[:1].expand_as(allowed)):
        raise _fail(m.logits, arch, "its mask differs between heads")
    try:
        window = classify_allowed(allowed[0])
    except BuildError as e:
        raise _fail(m.logits, arch, str(e)) from None
    step = (f[1] - f[0])[allowed] / _X
    scale = float(step.mean())
    if scale <= 0 or (step - scale).abs().max() > 1e-5 * scale or \
            ((f[2] - f[0])[allowed] / (2 * _X) - scale).abs().max() > 1e-5 * scale:
        raise _fail(m.logits, arch, "its scores are not one positive scale times q.k plus a "
                                    "bias")
    return window, scale, _alibi_slopes(m, arch, bias, allowed)


def _probe(m: EagerAttention, traced: Traced, heads: int, t: int, x: float) -> torch.Tensor:
    """The softmax input for scores all equal to x, as float64 [heads, t, t]."""
    def constant(placeholder: str) -> torch.Tensor | None:
        name = traced.placeholder_names.get(placeholder)
        return traced.buffers.get(name) if name is not None else None

    scores = torch.full((1, heads, t, t), x, dtype=torch.float32)
    try:
        out = evaluate(m.logits, t, {m.scores: scores}, constant)
    except BuildError:
        raise _fail(m.logits, traced.architecture, "its scores depend on a weight beyond q.k "
                                                   "(a learned position bias)") from None
    try:
        return out.double().expand(1, heads, t, t)[0]
    except RuntimeError:
        raise _fail(m.logits, traced.architecture,
                    f"its score bias has shape {tuple(out.shape)}") from None


def _alibi_slopes(m: EagerAttention, arch: str, bias: torch.Tensor, allowed: torch.Tensor
                  ) -> torch.Tensor | None:
    """Per-head slopes when bias[h, i, j] = slopes[h] * (j - i) + c[h, i] on the allowed keys;
    None for a bias constant per row (no position bias); raises for any other."""
    t = bias.shape[-1]
    bias = torch.where(allowed, bias, 0.0)
    # relative to each row's diagonal (key = query), which every causal row allows
    rel = bias - torch.diagonal(bias, dim1=1, dim2=2)[:, :, None]
    first = int(allowed[0, -1].nonzero()[0])  # the last row's first allowed key
    slopes = -rel[:, t - 1, first] / (t - 1 - first) if first < t - 1 else rel[:, 0, 0]
    dist = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).double()
    off = torch.where(allowed, rel - slopes[:, None, None] * dist, 0.0)
    tol = 1e-5 * max(1.0, float(bias.abs().max()))
    if off.abs().max() > tol:
        raise _fail(m.logits, arch, "it adds a position bias to its scores that is not ALiBi "
                                    "(a slope per head times the key's distance)")
    return None if slopes.abs().max() <= tol / t else slopes.float()


def _exact_scale(m: EagerAttention, fitted: float) -> float:
    """The scale as the model wrote it when the scores' first op multiplies (or divides) them
    by a number that agrees with the fit; else the fit."""
    users = _users(m.scores)
    first = users[0] if len(users) == 1 else None
    if first is None or first.target not in _SCALE_OPS or \
            not isinstance(first.args[1], int | float) or not first.args[1]:
        return fitted
    value = float(first.args[1])
    value = 1.0 / value if first.target in (aten.div.Tensor, aten.div.Scalar) else value
    return value if math.isclose(value, fitted, rel_tol=1e-5) else fitted


# ---- rewriting -----------------------------------------------------------------------------
def _replace(m: EagerAttention, variant: dict) -> None:
    graph = m.out.graph
    with graph.inserting_before(m.out):
        node = graph.call_function(torch.ops.llm_engine.attention.default,
                                   (m.q, m.k, m.v, None, None, variant["scale"], 0.0))
    node.meta = {**m.out.meta, VARIANT: {"window": variant["window"],
                                         "alibi": variant["alibi"]}}
    m.out.replace_all_uses_with(node)
