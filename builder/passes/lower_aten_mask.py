"""Causal-mask folding for lower_aten: decide what an attention mask computes by running it.

HF builds the attention mask from `position_ids` with code that changes between versions, so
matching its ops would break with every release. Instead the mask's subgraph is evaluated on
a concrete probe; a causal or sliding-window mask is dropped from the IR (paged attention is
causal by construction) and anything else fails the build.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from llm_engine.builder.errors import BuildError

aten = torch.ops.aten


def mask_arg(node: torch.fx.Node):
    if len(node.args) > 3:
        return node.args[3]
    return node.kwargs.get("attn_mask")


def _eval_mask(mask: torch.fx.Node, t: int) -> torch.Tensor:
    """Run the mask's subgraph on CPU for one sequence of t tokens at positions 0..t-1."""
    return evaluate(mask, t)


def evaluate(node: torch.fx.Node, t: int, given: dict[torch.fx.Node, torch.Tensor] | None = None,
             constant: Callable[[str], torch.Tensor | None] | None = None) -> torch.Tensor:
    """Run node's subgraph on CPU for one sequence of t tokens at positions 0..t-1. `given`
    fixes some nodes' values (their own inputs are not evaluated); `constant` returns the
    value of a placeholder that is a buffer or lifted constant (None: a weight, refused)."""
    given = given or {}
    env: dict[torch.fx.Node, object] = dict(given)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    needed = sorted(_ancestors(node, set(given)) | {node}, key=order.get)

    def val(a):
        return torch.fx.node.map_arg(a, lambda n: env[n])

    for n in needed:
        if n in given:
            continue
        if n.op == "placeholder":
            if n.target == "input_ids":
                env[n] = torch.zeros(1, t, dtype=torch.long)
            elif n.target == "position_ids":
                env[n] = torch.arange(t).unsqueeze(0)
            elif constant is not None and (value := constant(n.target)) is not None:
                env[n] = value
            else:
                raise BuildError(f"attention mask depends on weight {n.target}; cannot fold it")
        elif n.target is aten.sym_size.int:
            env[n] = t
        else:
            kwargs = {k: (torch.device("cpu") if k == "device" else v)
                      for k, v in val(n.kwargs).items()}
            env[n] = n.target(*val(n.args), **kwargs)
    return env[node]


def _ancestors(node: torch.fx.Node, stop: set[torch.fx.Node] | None = None
               ) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            if not stop or n not in stop:
                stack.extend(n.all_input_nodes)
    return seen


def classify_mask(mask: torch.fx.Node) -> int | None:
    """Return None for a causal mask, W for a sliding window of W; raise otherwise."""
    t = 37
    m = _eval_mask(mask, t)
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return classify_allowed(allowed.expand(1, 1, t, t)[0, 0])


def classify_allowed(allowed: torch.Tensor) -> int | None:
    """classify_mask of the [t, t] boolean matrix of the keys each query may attend to."""
    t = allowed.shape[-1]
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    if torch.equal(allowed, j <= i):
        return None
    for w in range(1, t):
        if torch.equal(allowed, (j <= i) & (j > i - w)):
            return w
    raise BuildError("attention mask is neither causal nor a sliding window; cannot fold it")
