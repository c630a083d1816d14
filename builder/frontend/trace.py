"""Trace an HF causal LM's stateless forward with torch.export, on the meta device.

The traced function is `(input_ids [1, T], position_ids [1, T]) -> logits [1, T, V]` with T
dynamic. Parameters live on the meta device, so tracing costs no weight memory; buffers that
the model computes at init (RoPE inverse frequencies) are computed for real and kept, since
no checkpoint holds them.
"""

from __future__ import annotations

import contextlib
import operator
import time
from dataclasses import dataclass, field

import torch
import torch.fx

from llm_engine.builder.errors import BuildError
from llm_engine.builder.frontend import attention_op, complex_ops, moe_op
from llm_engine.builder.frontend.checkpoint_names import weight_transforms_for

MAX_TOKENS = 1 << 16


class _Forward(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


@dataclass
class Traced:
    program: torch.export.ExportedProgram
    placeholder_names: dict[str, str]  # graph placeholder -> state-dict name
    buffers: dict[str, torch.Tensor]  # state-dict name -> value computed at init
    aliases: dict[str, str]  # tied parameter name -> the name that owns it
    param_dtypes: dict[str, torch.dtype]
    architecture: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    # transformers' checkpoint-key renamings and merges for this model (checkpoint_names.py)
    weight_transforms: list = field(default_factory=list)
    base_model_prefix: str | None = None
    # buffers saved with the model (a MoE router's score-correction bias): the checkpoint's
    # value wins over the one computed at init, as in from_pretrained
    persistent_buffers: frozenset[str] = frozenset()
    # the largest token count T the program was traced for (trace._export)
    max_tokens: int = MAX_TOKENS


def _tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    owners: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owners:
            aliases[name] = owners[id(p)]
        else:
            owners[id(p)] = name
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict) and getattr(model.config, "tie_word_embeddings", False):
        for target, source in tied.items():
            aliases.setdefault(target, source)
    return aliases


def _persistent_buffers(model: torch.nn.Module) -> frozenset[str]:
    names = set()
    for prefix, module in model.named_modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in skip:
                names.add(f"{prefix}.{name}" if prefix else name)
    return frozenset(names)


def build_meta_model(config, dtype: torch.dtype) -> torch.nn.Module:
    config._attn_implementation = attention_op.register()
    # a transformers without ExpertsInterface has no MoE models of this form either
    with contextlib.suppress(ImportError):
        config._experts_implementation = moe_op.register()
    model = _instantiate(config, dtype)
    if not getattr(model, "_supports_attention_backend", True):
        # The model computes attention in its own eager code (MPT's ALiBi), never calling
        # AttentionInterface, and reads the mask HF builds for it as eager code expects
        # (MPT: True = masked), not as the engine's boolean sdpa mask (True = allowed):
        # trace it as HF runs it, and let lower_aten recognise the eager attention.
        config._attn_implementation = "eager"
        model = _instantiate(config, dtype)
    return model.eval()


def _instantiate(config, dtype: torch.dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:
        arch = (config.architectures or [config.model_type])[0]
        raise BuildError(f"transformers cannot instantiate {arch}: {e}") from e


def trace_model(config, dtype: torch.dtype) -> Traced:
    start = time.perf_counter()
    model = build_meta_model(config, dtype)
    arch = type(model).__name__
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    persistent = _persistent_buffers(model)
    aliases = _tied_aliases(model)
    param_dtypes = {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}
    weight_transforms = weight_transforms_for(model)
    model.to("meta")
    program, max_tokens = _export(model, config, arch)
    if _mutates_views(program.graph_module.graph):
        # Writes into slices of a fresh tensor (DeepSeek's MLA builds K as new_empty + two
        # copy_ into its halves) or in-place scatters: functionalize (no op decomposed), so
        # the lowering sees slice_scatter / scatter values instead of mutations.
        program = program.run_decompositions({})
    _drop_asserts(program.graph_module.graph)  # lower_aten skips them; not what they read
    _inline_wrappers(program.graph_module, arch)
    # Llama 4: complex RoPE, and a router that scatters its top-k logits into -inf
    if complex_ops.realify_complex(program.graph_module) + \
            complex_ops.scatter_topk_as_mask(program.graph_module) + \
            complex_ops.repeat_as_expand(program.graph_module):
        program.graph_module.recompile()
    sig = program.graph_signature
    names = {}
    for ph, target in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items():
        names[ph] = target.removeprefix("m.")
    # Tensors the model creates in forward (not parameters or buffers) are lifted to inputs
    # too; they are values of the trace, kept like buffers.
    for ph, target in sig.inputs_to_lifted_tensor_constants.items():
        name = "constant." + target.removeprefix("m.")
        names[ph] = name
        buffers[name] = program.constants[target].detach().clone()
    return Traced(program, names, buffers, aliases, param_dtypes, arch,
                  time.perf_counter() - start, weight_transforms=weight_transforms,
                  persistent_buffers=persistent, max_tokens=max_tokens,
                  base_model_prefix=getattr(model, "base_model_prefix", None) or None)


def _export(model: torch.nn.Module, config, arch: str
            ) -> tuple[torch.export.ExportedProgram, int]:
    """(program, the largest T it was traced for). Some models slice a table made for their
    context length L by the token count (MPT's ALiBi bias: `bias[..., max(0, L - T):]`), which
    export can only trace as one graph for T < L; they are traced again with T bounded so.
    lower_aten then checks that nothing the logits need still depends on the bound."""
    try:
        return _export_upto(model, MAX_TOKENS), MAX_TOKENS
    except Exception as e:
        context = _context_length(config)
        if not (_range_violated(e) and context is not None and 1 < context <= MAX_TOKENS):
            raise _export_error(arch, e) from e
    try:
        return _export_upto(model, context - 1), context - 1
    except Exception as e:
        if not _range_violated(e):
            raise _export_error(arch, e) from e
        first = e
    # A guard that holds for every T but that export's solver cannot prove (Llama 4's dense
    # experts: `bmm(...).view(-1, H)` gets the stride Min(H, H*T), and the `reshape` after it
    # guards T*Min(H, H*T) == H*T): trace with the guards kept as runtime asserts, and accept
    # the program only if each assert holds for every T it is traced for.
    try:
        program = _export_upto(model, MAX_TOKENS, deferred=True)
    except Exception as e:
        raise _export_error(arch, e) from e
    if not _asserts_hold(program, MAX_TOKENS):
        raise _export_error(arch, first) from first
    return program, MAX_TOKENS


def _drop_asserts(graph: torch.fx.Graph) -> None:
    """Remove the proven runtime asserts and the symbolic-size arithmetic only they read."""
    for node in reversed(list(graph.nodes)):
        if node.target is torch.ops.aten._assert_scalar.default or (
                not node.users and node.op == "call_function" and
                not isinstance(node.meta.get("val"), torch.Tensor) and
                (getattr(node.target, "__module__", None) in ("_operator", "operator") or
                 node.target in (torch.sym_min, torch.sym_max))):
            graph.erase_node(node)


def _export_upto(model: torch.nn.Module, max_tokens: int, deferred: bool = False
                 ) -> torch.export.ExportedProgram:
    tokens = torch.export.Dim("T", min=1, max=max_tokens)
    # Distinct example tensors: export would merge identical inputs into one placeholder.
    ids = torch.zeros(1, 7, dtype=torch.long, device="meta")
    pos = torch.zeros(1, 7, dtype=torch.long, device="meta")
    return torch.export.export(_Forward(model), (ids, pos),
                               dynamic_shapes=({1: tokens}, {1: tokens}), strict=False,
                               prefer_deferred_runtime_asserts_over_guards=deferred)


def _asserts_hold(program: torch.export.ExportedProgram, max_tokens: int) -> bool:
    """Every runtime assert of the program (a guard on T only) is true for T = 1..max_tokens."""
    import sympy

    for node in program.graph_module.graph.nodes:
        if node.target is not torch.ops.aten._assert_scalar.default:
            continue
        val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        expr = getattr(getattr(val, "node", None), "expr", None)
        if expr is sympy.true:  # input_ids and position_ids both have T tokens
            continue
        if expr is None or len(expr.free_symbols) != 1:
            return False
        try:
            check = sympy.lambdify(list(expr.free_symbols), expr, "math")
            if not all(check(t) for t in range(1, max_tokens + 1)):
                return False
        except Exception:
            return False
    return True


def _range_violated(e: Exception) -> bool:
    """export found that T's range splits into cases (a guard on T it cannot drop)."""
    return "Constraints violated (T)" in str(e)


def _context_length(config) -> int | None:
    for name in ("max_position_embeddings", "max_seq_len", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _export_error(arch: str, e: Exception) -> BuildError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return BuildError(f"torch.export failed for {arch}: {first}")


# In-place ops lower_aten lowers as their out-of-place forms (they mutate no view).
_INPLACE_ARITH = frozenset({"aten::add_", "aten::sub_", "aten::mul_", "aten::div_"})


def _mutates_views(graph: torch.fx.Graph) -> bool:
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable and \
                schema.name not in _INPLACE_ARITH:
            return True
    return False


def _wrapper_parts(node: torch.fx.Node) -> tuple[torch.fx.Node, tuple] | None:
    """(submodule node, operands) of a grad-mode or autocast region that export kept as a
    higher-order op, else None. transformers versions differ here: RoPE's forward runs under
    `@torch.no_grad()` in some (a `wrap_with_set_grad_enabled` region reading `inv_freq`) and
    under `torch.autocast(enabled=False)` in others."""
    hops = torch.ops.higher_order
    if node.op != "call_function":
        return None
    if node.target is getattr(hops, "wrap_with_set_grad_enabled", None):
        return node.args[1], tuple(node.args[2:])
    if node.target is getattr(hops, "wrap_with_autocast", None):
        # (device_type, dtype, enabled, cache_enabled, submodule, *operands)
        return node.args[4], tuple(node.args[5:])
    return None


def _inline_wrappers(gm: torch.fx.GraphModule, arch: str) -> None:
    """Replace each grad-mode / autocast region by the ops inside it. Inference runs without
    grad, and a disabled autocast region's ops carry their own casts, so the ops alone are the
    computation; an enabled autocast region would change dtypes after tracing and is refused."""
    graph = gm.graph
    for node in list(graph.nodes):
        parts = _wrapper_parts(node)
        if parts is None:
            continue
        sub_node, operands = parts
        if node.target is getattr(torch.ops.higher_order, "wrap_with_autocast", None) \
                and node.args[2]:
            raise BuildError(f"{arch} traces with autocast enabled inside the model; build with "
                             "the dtype autocast would pick (--dtype) instead")
        sub = getattr(gm, sub_node.target)
        _inline_wrappers(sub, arch)  # regions nest
        env: dict[torch.fx.Node, object] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, operands))
        outputs = None
        with graph.inserting_before(node):
            for sn in sub.graph.nodes:
                if sn.op == "placeholder":
                    continue
                if sn.op == "output":
                    outputs = torch.fx.map_arg(sn.args[0], env.__getitem__)
                    break
                if sn.op == "get_attr":  # a constant of the region: hoist it to the parent
                    name = f"_inlined_{sub_node.target}_{sn.target}".replace(".", "_")
                    setattr(gm, name, getattr(sub, sn.target))
                    env[sn] = graph.get_attr(name)
                    env[sn].meta = dict(sn.meta)
                    continue
                env[sn] = graph.node_copy(sn, env.__getitem__)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
            else:
                raise BuildError(f"{arch}: a traced {node.target} region's result is used as a "
                                 "whole; no lowering exists; file an issue with the model name")
        graph.erase_node(node)
        if not sub_node.users:
            graph.erase_node(sub_node)
            delattr(gm, sub_node.target)
    graph.lint()
    gm.recompile()
