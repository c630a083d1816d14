"""Tiny random-weight models of every architecture the builder supports."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "llama_tied", "mistral", "qwen2", "gpt2")


def tiny_config(arch: str):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=320, hidden_size=72, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0)
    if arch == "llama_tied":  # SmolLM2's shape: 9 query heads over 3 KV heads, tied embeddings
        return LlamaConfig(**{**common, "num_attention_heads": 9, "num_key_value_heads": 3,
                              "hidden_size": 144}, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False, use_sliding_window=False)
    if arch == "gpt2":
        return GPT2Config(vocab_size=320, n_embd=72, n_layer=2, n_head=6, n_positions=256,
                          bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    raise ValueError(arch)


def make_checkpoint(arch: str, path: Path, seed: int = 0):
    """Save a seeded random model as an HF checkpoint dir; returns (dir, fp32 model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    with torch.no_grad():  # random init is small; widen it so logits are well separated
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(2.0)
    model.save_pretrained(path)
    return path, model


def build_tiny_engine(ckpt: Path, out: Path, **options) -> Path:
    from builder.build import BuildOptions, build_engine

    return build_engine(BuildOptions(model=str(ckpt), output=out, max_batch_tokens=64,
                                     **options))
