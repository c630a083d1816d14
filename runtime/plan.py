"""Execute a plan (plan.rank<N>.json) with the torch reference ops of `kernels/`.

The plan is a straight-line op list; this runner binds each op to its function once at load,
so a step is a loop over prebound calls. Values are dropped after their last reader (the
plan's `free` lists), which is what keeps activation memory at the planned peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llm_engine.kernels.ops import OPS
from llm_engine.kernels.symbolic import has_sym, resolve


class PlanError(ValueError):
    pass


@dataclass
class _Step:
    name: str
    op: str
    fn: Any
    inputs: list[str]
    attrs: dict[str, Any]
    symbolic: bool
    needs_ctx: bool
    free: list[str]


class PlanRunner:
    def __init__(self, plan: dict[str, Any], weights: dict[str, torch.Tensor],
                 kernels: dict[str, Any] | None = None) -> None:
        """`kernels` maps node names to compiled kernels used instead of the reference op."""
        kernels = kernels or {}
        self.plan = plan
        self.outputs: list[str] = plan["outputs"]
        self.steps: list[_Step] = []
        for node in plan["nodes"]:
            op = OPS.get(node["op"])
            if op is None:
                raise PlanError(f"plan node {node['name']}: unknown op {node['op']!r}; "
                                "the engine needs a newer llm-engine")
            attrs = node["attrs"]
            if node["op"] == "weight":
                if attrs["name"] not in weights:
                    raise PlanError(f"weight {attrs['name']!r} missing from the weight file")
                attrs = {**attrs, "value": weights[attrs["name"]]}
            fn = kernels.get(node["name"], op.fn)
            self.steps.append(_Step(node["name"], node["op"], fn, node["inputs"], attrs,
                                    has_sym(attrs), op.needs_ctx, node.get("free", [])))
        self.input_names = {i["node"]: i["name"] for i in plan["inputs"]}

    def run(self, feeds: dict[str, torch.Tensor], ctx: Any = None) -> list[torch.Tensor]:
        env: dict[str, Any] = {}
        sizes = {"T": feeds["input_ids"].shape[-1]}
        if "logits_indices" in feeds:
            sizes["N"] = feeds["logits_indices"].shape[0]
        for step in self.steps:
            if step.op == "input":
                env[step.name] = feeds[step.attrs["name"]]
                continue
            if step.op == "weight":
                env[step.name] = step.attrs["value"]
                continue
            args = [env[i] for i in step.inputs]
            attrs = resolve(step.attrs, sizes) if step.symbolic else step.attrs
            if step.needs_ctx:
                env[step.name] = step.fn(*args, ctx=ctx, **attrs)
            else:
                env[step.name] = step.fn(*args, **attrs)
            for name in step.free:
                del env[name]
        return [env[o] for o in self.outputs]
