"""transformers versions express the same model differently to torch.export: RoPE's forward
runs under `@torch.no_grad()` in some (a `wrap_with_set_grad_enabled` region reading the
`inv_freq` buffer through a submodule), under `torch.autocast(enabled=False)` in others, and a
tensor made in forward is a lifted constant. Each must build the same engine function, checked
against HF on a tiny Llama whose RoPE is rewritten in that style."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers.models.llama import modeling_llama

from tests.harness import PagedRunner
from tests.models import build_tiny_engine

ROPE = modeling_llama.LlamaRotaryEmbedding
FP32_ATOL = 1e-4  # as test_hf_match: reassociation only


def _no_grad(forward, config):
    return torch.no_grad()(forward)


def _autocast_off(forward, config):
    @functools.wraps(forward)
    def wrapped(self, x, position_ids):
        with torch.autocast(device_type="cpu", enabled=False):
            return forward(self, x, position_ids)
    return wrapped


def _constant_inv_freq(forward, config):
    # inv_freq read from a tensor captured by the forward, not from the module's buffer:
    # export lifts it as a constant input (real values, while the model is on the meta device)
    dim = config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)

    @functools.wraps(forward)
    def wrapped(self, x, position_ids):
        inv = inv_freq.to(x.device)
        freqs = position_ids[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), \
            (emb.sin() * self.attention_scaling).to(x.dtype)
    return wrapped


@pytest.mark.parametrize("style", [_no_grad, _autocast_off, _constant_inv_freq],
                         ids=["no_grad", "autocast_off", "constant"])
def test_rope_styles_build_the_hf_function(style, checkpoints, tmp_path, monkeypatch):
    ckpt, hf = checkpoints("llama")
    monkeypatch.setattr(ROPE, "forward", style(ROPE.forward, hf.config))
    path = build_tiny_engine(ckpt, tmp_path / "e")
    plan = (path / "plan.rank0.json").read_text()
    assert ('"constant.' in plan) == (style is _constant_inv_freq)  # the captured tensor is stored as a constant weight
    tokens = torch.randint(0, 320, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    got = PagedRunner(path, backend="reference").step([(0, tokens)], all_rows=True)[0]
    with torch.no_grad():
        want = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)


def test_enabled_autocast_region_is_a_clear_error(checkpoints, tmp_path, monkeypatch):
    from llm_engine.builder.errors import BuildError

    forward = ROPE.forward

    def autocast_on(self, x, position_ids):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return forward(self, x, position_ids)

    monkeypatch.setattr(ROPE, "forward", autocast_on)
    ckpt, _ = checkpoints("llama")
    with pytest.raises(BuildError, match="autocast enabled"):
        build_tiny_engine(ckpt, tmp_path / "e")
