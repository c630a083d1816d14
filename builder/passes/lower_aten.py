"""lower_aten: turn the exported ATen graph into IR, folding the causal mask away.

Every ATen op maps to one IR op (or none, for no-ops such as `contiguous`, `dropout` in
eval mode and same-dtype casts). The attention mask HF builds from `position_ids` is
evaluated on concrete inputs: if it is causal (or a sliding window) it is dropped and the
attention node records that, because paged attention is causal by construction. An op with
no lowering fails the build, naming the op, the HF module it came from and the architecture.

This file is the walk over the fx graph (weights, inputs, the order nodes are lowered in);
the per-op handlers are in lower_aten_ops.py and the mask folding in lower_aten_mask.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from llm_engine.builder.errors import BuildError
from llm_engine.builder.frontend.trace import MAX_TOKENS, Traced
from llm_engine.builder.ir import Graph, WeightSpec
from llm_engine.builder.passes.lower_aten_eager import rewrite_eager_attention
from llm_engine.builder.passes.lower_aten_mask import mask_arg
from llm_engine.builder.passes.lower_aten_ops import (
    ATTENTION_OPS,
    HANDLERS,
    module_path,
    shape_of,
    sym_str,
)
from llm_engine.builder.passes.report import PassReport
from llm_engine.kernels.dtypes import dtype_name

aten = torch.ops.aten


# ---- the lowering ----------------------------------------------------------------------
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
        if name in self.traced.buffers and not (name in self.traced.persistent_buffers
                                                and self.available(name)):
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

    def literal(self, value: torch.Tensor, key: str | None = None) -> str:
        """A tensor kept like a buffer, its value stored in the engine: one the lowering
        computed from constants alone (an arange of fixed bounds), or a constant the graph
        reads (`key`: its fx target)."""
        name = f"constant.{key or self.current.name}"
        if name not in self.weight_nodes:
            self.traced.buffers[name] = value.detach().clone()
            spec = WeightSpec(name, tuple(value.shape), dtype_name(value.dtype),
                              {"buffer": name})
            self.weight_nodes[name] = self.graph.add_weight(spec, origin=[self.current.name]).name
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
        return self.literal(value, key=str(node.target))

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
            if n.target in ATTENTION_OPS:
                mask = mask_arg(n)
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
                packet = getattr(node.target, "overloadpacket", None)
                if packet is not None and packet.__name__.endswith("_") and node.args and \
                        isinstance(node.args[0], torch.fx.Node):
                    # an in-place op: later readers of the mutated tensor see the result
                    self.env[node.args[0]] = self.env[node]
            elif node.op == "get_attr":
                self.env[node] = self.constant(node)
            else:
                raise self.fail(f"fx node kind {node.op}")
        self.graph.dce()
        return self.graph

    def lower_call(self, node: torch.fx.Node):
        target = node.target
        if target is aten.sym_size.int or isinstance(node.meta.get("val"), torch.SymInt):
            # a size or arithmetic on sizes (Llama 4's reshape to 4*T rows): an expression of T
            return {"sym": str(sym_str(node.meta["val"]))}
        handler = HANDLERS.get(target) or HANDLERS.get(getattr(target, "overloadpacket", None))
        if handler is None:
            raise self.fail(f"unsupported op {target}")
        args = [self.value(a) for a in node.args]
        kwargs = {k: self.value(v) for k, v in node.kwargs.items()}
        return handler(self, node, args, kwargs)


def lower_aten(traced: Traced, options: Any) -> tuple[Graph, PassReport]:
    """The first pass: torch.export's ATen graph -> the IR graph. `options.weights` is the
    checkpoint's tensors by name; a weight the graph reads that it lacks is refused."""
    before = sum(1 for n in traced.program.graph_module.graph.nodes if n.op == "call_function")
    eager = rewrite_eager_attention(traced)
    lowering = Lowering(traced, options.weights.__contains__)
    if traced.max_tokens < MAX_TOKENS:
        _check_token_bound(lowering)
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
    if eager:
        report.stats["eager_attention"] = eager
        report.notes.append(f"{eager} eager attentions (the model's own matmul / softmax code) "
                            "recognised and replaced by the engine's attention")
    return graph, report


def _check_token_bound(lowering: Lowering) -> None:
    """A trace bounded to T < L (trace._export) holds for any step size only if what the
    logits need has no case split on T left: the table slicing that forced the bound must be
    gone with the attention it fed."""
    for node in lowering.needed_nodes():
        val = node.meta.get("val")
        shape = val.shape if isinstance(val, torch.Tensor) else [val]
        if node.target in (torch.sym_max, torch.sym_min) or \
                any("Max(" in str(s) or "Min(" in str(s) for s in shape):
            lowering.current = node
            raise lowering.fail(f"{node.target}, a size that is valid only for up to "
                                f"{lowering.traced.max_tokens} tokens,")
