"""lower_aten on tiny torch.export programs (one attention block, not a whole model): the
attention mask HF-style code builds from position_ids is folded when causal or a sliding
window and refused otherwise; an op with no lowering fails the build naming the op, the
module it came from and the architecture; the lowered graph computes the module's function."""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm_engine.builder.errors import BuildError
from llm_engine.builder.frontend.trace import Traced
from llm_engine.builder.passes.lower_aten import lower_aten
from llm_engine.builder.verify import verify
from tests.graphs import run

ARCH = "TinyForCausalLM"
HEADS, HEAD_DIM, HIDDEN, VOCAB = 2, 4, 8, 16


class Attention(nn.Module):
    """One attention block whose mask is built from position_ids the way HF's mask helpers
    do (broadcast comparisons of query and key positions)."""

    def __init__(self, mask: str, window: int, unsupported: bool) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(HIDDEN, HIDDEN)
                                                              for _ in range(4))
        self.mask, self.window, self.unsupported = mask, window, unsupported

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(1, -1, HEADS, HEAD_DIM).transpose(1, 2)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
        q_pos, k_pos = position_ids[:, None, :, None], position_ids[:, None, None, :]
        mask: torch.Tensor | None = None
        causal = k_pos <= q_pos
        if self.mask == "causal":
            mask = causal
        elif self.mask == "float_causal":  # the additive form: 0 where allowed, min elsewhere
            mask = torch.zeros_like(causal, dtype=torch.float32).masked_fill(
                ~causal, torch.finfo(torch.float32).min)
        elif self.mask == "window":
            mask = causal & (k_pos > q_pos - self.window)
        elif self.mask == "bidirectional":
            mask = (k_pos >= 0) | (q_pos >= 0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             is_causal=self.mask == "is_causal")
        out = out.transpose(1, 2).reshape(1, -1, HIDDEN)
        if self.unsupported:
            out = torch.cumsum(out, dim=-1)
        return self.o_proj(out)


class TinyModel(nn.Module):
    def __init__(self, mask: str, window: int, unsupported: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.attn = Attention(mask, window, unsupported)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.attn(self.embed(input_ids), position_ids)


class Forward(nn.Module):
    """Holds the model as `m`, like the builder's tracing wrapper, so module paths read as
    the model's own (`attn`, not `m.attn`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids, position_ids)


@cache
def traced(mask: str = "causal", window: int = 4, unsupported: bool = False,
           ) -> tuple[Traced, nn.Module, dict[str, torch.Tensor]]:
    """Export a seeded TinyModel with a dynamic token count, as trace_model would; returns
    the program, the eager model and its state dict under checkpoint names."""
    torch.manual_seed(0)
    model = Forward(TinyModel(mask, window, unsupported)).eval()
    tokens = torch.export.Dim("T", min=1, max=1024)
    ids = torch.zeros(1, 7, dtype=torch.long)
    pos = torch.arange(7)[None]
    program = torch.export.export(model, (ids, pos), dynamic_shapes=({1: tokens}, {1: tokens}),
                                  strict=False)
    sig = program.graph_signature
    names = {ph: target.removeprefix("m.") for ph, target in
             {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items()}
    state = {k.removeprefix("m."): v for k, v in model.state_dict().items()}
    return Traced(program, names, {}, {}, {k: v.dtype for k, v in state.items()}, ARCH, 0.0,
                  notes=[]), model, state


def _lower(mask: str = "causal", **kwargs):
    program, model, state = traced(mask, **kwargs)
    graph, report = lower_aten(program, SimpleNamespace(weights=state))
    return graph, report, model, state


@pytest.mark.parametrize("mask", ["causal", "float_causal"])
def test_causal_mask_is_folded(mask: str) -> None:
    graph, report, _, _ = _lower(mask)
    verify(graph)
    (attn,) = [n for n in graph.nodes() if n.op == "sdpa"]
    assert attn.attrs == {"scale": HEAD_DIM ** -0.5, "window": None}
    # the mask subgraph is gone, and with it the only reader of position_ids
    assert graph.inputs == ["input_ids"]
    assert report.stats["masks_folded"] == 1 and report.stats["mask_ops_removed"] > 0
    assert graph.meta["architecture"] == ARCH
    assert "1 attention masks verified causal" in report.notes[0]


def test_sliding_window_mask_records_window() -> None:
    graph, report, _, _ = _lower("window", window=4)
    (attn,) = [n for n in graph.nodes() if n.op == "sdpa"]
    assert attn.attrs["window"] == 4
    assert report.stats["masks_folded"] == 1


def test_is_causal_flag_without_mask() -> None:
    graph, report, _, _ = _lower("is_causal")
    (attn,) = [n for n in graph.nodes() if n.op == "sdpa"]
    assert attn.attrs["window"] is None
    assert report.stats["masks_folded"] == 0


def test_bidirectional_mask_is_refused() -> None:
    with pytest.raises(BuildError, match="neither causal nor a sliding window"):
        _lower("bidirectional")


def test_attention_without_mask_or_causal_flag_is_refused() -> None:
    with pytest.raises(BuildError, match=rf"non-causal attention in module attn of {ARCH}"):
        _lower("none")


def test_unsupported_op_names_op_module_and_architecture() -> None:
    with pytest.raises(BuildError) as info:
        _lower(unsupported=True)
    message = str(info.value)
    assert "unsupported op aten.cumsum.default" in message
    assert "in module attn of TinyForCausalLM" in message
    assert "file an issue" in message


def test_missing_checkpoint_tensor_is_refused() -> None:
    program, _, state = traced()
    with pytest.raises(BuildError, match=r"checkpoint has no tensor 'attn.o_proj.bias'"):
        lower_aten(program, SimpleNamespace(weights={k: v for k, v in state.items()
                                                     if k != "attn.o_proj.bias"}))


def test_lowered_graph_computes_the_module() -> None:
    graph, _, model, state = _lower("window", window=3)
    weights = {spec.name: state[spec.recipe["load"]] for spec in graph.weights.values()}
    assert set(graph.weights) == set(state)  # weights keep their checkpoint names
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    pos = torch.arange(ids.shape[1])[None]
    (got,) = run(graph, {"input_ids": ids}, weights)
    with torch.no_grad():
        want = model(ids, pos)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_origins_name_the_module() -> None:
    # every lowered node says which traced node and HF module it came from
    graph, _, _, _ = _lower()
    linears = [n for n in graph.nodes() if n.op == "linear"]
    assert sorted(n.origin[0].split("@")[1] for n in linears) == [
        "attn.k_proj", "attn.o_proj", "attn.q_proj", "attn.v_proj"]
    embedding = next(n for n in graph.nodes() if n.op == "embedding")
    assert embedding.origin[0].endswith("@embed")
