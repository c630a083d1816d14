"""ALiBi (MPT): the reference paged attention against plain torch, the ONNX graph against the
reference, and the trace-time proof that a score bias is ALiBi (anything else is refused).
MPT end to end against HF is in test_hf_match."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from llm_engine.builder.errors import BuildError
from llm_engine.kernels.attention import paged_attention
from llm_engine.runtime.onnx_backend import attention_metadata
from tests.harness import PagedRunner

HEADS, KV_HEADS, D, BLOCK = 6, 2, 8, 4
SLOPES = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]  # MPT's for 6 heads


def _steps():
    """Three steps over three sequences: prefills, a chunked prefill, batched decodes."""
    return [{0: 9, 1: 5}, {0: 1, 1: 4, 2: 6}, {0: 1, 1: 1, 2: 1}]


def _plain(q, k, v, scale):
    """One sequence's attention in plain torch: q [H, n, D] at the last n of k's positions."""
    groups = HEADS // KV_HEADS
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    n, s = q.shape[1], k.shape[1]
    q_pos = torch.arange(s - n, s)[:, None]
    k_pos = torch.arange(s)[None, :]
    scores = q @ k.transpose(-1, -2) * scale
    scores = scores + torch.tensor(SLOPES)[:, None, None] * (k_pos - q_pos)
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.softmax(scores, -1) @ v


def test_paged_attention_alibi_matches_plain_torch():
    g = torch.Generator().manual_seed(0)
    cache = (torch.zeros(32, BLOCK, KV_HEADS, D), torch.zeros(32, BLOCK, KV_HEADS, D))
    ctx = SimpleNamespace(kv_caches=[cache])
    history = {s: (torch.zeros(KV_HEADS, 0, D), torch.zeros(KV_HEADS, 0, D)) for s in range(3)}
    tables = {s: [s * 8 + b for b in range(8)] for s in range(3)}  # contiguous per sequence
    scale = 0.3
    for work in _steps():
        t = sum(work.values())
        q = torch.randn(1, HEADS, t, D, generator=g)
        k, v = torch.randn(1, KV_HEADS, t, D, generator=g), torch.randn(1, KV_HEADS, t, D,
                                                                         generator=g)
        slots, starts, lens, want = [], [0], [], []
        for s, n in work.items():
            row = starts[-1]
            hk, hv = history[s]
            hk = torch.cat([hk, k[0, :, row:row + n]], 1)
            hv = torch.cat([hv, v[0, :, row:row + n]], 1)
            history[s] = (hk, hv)
            past = hk.shape[1] - n
            slots += [tables[s][p // BLOCK] * BLOCK + p % BLOCK for p in range(past, past + n)]
            starts.append(row + n)
            lens.append(hk.shape[1])
            want.append(_plain(q[0, :, row:row + n], hk, hv, scale))
        bt = torch.tensor([tables[s] for s in work], dtype=torch.int32)
        out = paged_attention(q, k, v, torch.tensor(slots), bt,
                              torch.tensor(lens, dtype=torch.int32),
                              torch.tensor(starts, dtype=torch.int32), ctx=ctx, layer=0,
                              scale=scale, alibi=SLOPES)
        torch.testing.assert_close(out[0], torch.cat(want, 1), atol=1e-5, rtol=1e-5)
        # the bias is what makes these right: without it the same call differs
        assert not torch.allclose(out, paged_attention(
            q, k, v, torch.tensor(slots), bt, torch.tensor(lens, dtype=torch.int32),
            torch.tensor(starts, dtype=torch.int32), ctx=ctx, layer=0, scale=scale), atol=1e-3)


def test_attention_metadata_relative_positions():
    # seq 0 decodes its 6th token (5 cached), seq 1 prefills 3 tokens after 2 cached ones
    feeds = {"query_start_loc": torch.tensor([0, 1, 4], dtype=torch.int32),
             "context_lens": torch.tensor([6, 5], dtype=torch.int32),
             "block_tables": torch.tensor([[7, 2], [5, 0]], dtype=torch.int32)}
    m = attention_metadata(feeds, block_size=4, windows=[], rel_pos=True)
    rel = m["attn.rel_pos"][:, 0]  # [B, Tq, C + Tq], as the mask
    assert rel.shape == m["attn.mask"][:, 0].shape
    assert rel[0, 0, :6].tolist() == [-5, -4, -3, -2, -1, 0]  # 5 cached keys, then itself
    # seq 1 row 1 is position 3: cached keys 0-1, new keys at positions 2-4
    assert rel[1, 1, :2].tolist() == [-3, -2] and rel[1, 1, 5:].tolist() == [-1, 0, 1]
    assert "attn.rel_pos" not in attention_metadata(feeds, block_size=4, windows=[])


def _mixed(runner: PagedRunner) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(0, 320, (n,), generator=g).tolist() for n in (19, 11, 6))
    first = runner.step([(0, a[:16]), (1, b[:5])], all_rows=True)
    second = runner.step([(0, a[16:17]), (1, b[5:]), (2, c)], all_rows=True)
    third = runner.step([(0, a[17:]), (1, [5]), (2, [7])], all_rows=True)
    return [*first.values(), *second.values(), *third.values()]


def test_onnx_alibi_matches_reference(engines):
    """The graph adds slopes x `attn.rel_pos` to its mask; the reference adds the bias to its
    scores: the same logits on prefill, chunked prefill and decode rows."""
    import onnx

    path = engines("mpt")
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    assert "attn.rel_pos" in {i.name for i in graph.input}
    plan = json.loads((path / "plan.rank0.json").read_text())
    attn = [n for n in plan["nodes"] if n["op"] == "paged_attention"]
    assert attn and all(n["attrs"]["alibi"] == SLOPES for n in attn)
    for r, o in zip(_mixed(PagedRunner(path)), _mixed(PagedRunner(path, backend="onnx"))):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=0)


def test_triton_declines_alibi():
    from llm_engine.kernels.triton.attention import params

    attrs = {"num_heads": HEADS, "num_kv_heads": KV_HEADS, "head_dim": D, "alibi": SLOPES}
    assert params(attrs, (1, HEADS, "T", D), "float32", "float32", BLOCK) is None
    assert params({**attrs, "alibi": None}, (1, HEADS, "T", D), "float32", "float32",
                  BLOCK) is not None


def _traced_mpt(monkeypatch, bias=None):
    from transformers import MptConfig
    from transformers.models.mpt import modeling_mpt

    from llm_engine.builder.frontend.trace import trace_model

    if bias is not None:
        # built from torch ops on the model's device, as MPT's own: export traces them
        monkeypatch.setattr(modeling_mpt.MptModel, "build_mpt_alibi_tensor",
                            lambda self, heads, length, *a, device=None, **k:
                            bias(heads, torch.arange(length, device=device, dtype=torch.float32)))
    config = MptConfig(vocab_size=320, d_model=48, n_heads=4, n_layers=1, max_seq_len=64)
    return trace_model(config, torch.float32)


def test_mpt_alibi_is_recognised(monkeypatch):
    from llm_engine.builder.passes.lower_aten_eager import VARIANT, rewrite_eager_attention

    traced = _traced_mpt(monkeypatch)
    assert traced.max_tokens == 63  # MPT slices its bias table by T: traced for T < 64
    assert rewrite_eager_attention(traced) == 1
    node = next(n for n in traced.program.graph_module.graph.nodes if VARIANT in n.meta)
    # 4 heads: MPT's slopes 2^-(8 h / 4), h = 1..4
    assert node.meta[VARIANT] == {"window": None, "alibi": [0.25, 0.0625, 0.015625, 0.00390625]}


@pytest.mark.parametrize(("bias", "why"), [
    # quadratic in the key's distance: a position bias, but not ALiBi
    (lambda h, pos: -0.01 * (pos - pos[-1]).pow(2).expand(h, 1, -1), "not ALiBi"),
    # a slope per head times log-distance (a bucketed, T5-like bias): not linear either
    (lambda h, pos: -torch.log1p(pos[-1] - pos).expand(h, 1, -1), "not ALiBi"),
])
def test_a_bias_that_is_not_alibi_fails_in_one_line(monkeypatch, bias, why):
    from llm_engine.builder.passes.lower_aten_eager import rewrite_eager_attention

    traced = _traced_mpt(monkeypatch, bias)
    with pytest.raises(BuildError, match=why) as e:
        rewrite_eager_attention(traced)
    assert "\n" not in str(e.value) and "transformer.blocks.0.attn" in str(e.value)
