"""Tiny random-weight models of every architecture the builder supports.

"llama" and "qwen2" checkpoints also carry a tiny byte-level BPE tokenizer (320 ids, the models'
vocab) with a ChatML template, so text prompts, chat templates, stop strings and streaming
detokenization can be tested in seconds. The other architectures have none (token ids only).
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "llama_tied", "mistral", "qwen2", "gpt2")
# More Hub architectures, traced through transformers with no model code of ours. Their
# configs set what makes each one differ (sliding windows shorter than the test prompts,
# scalar multipliers, interleaved RoPE, QK norms, post-norms), and their norms and biases
# are randomized too (make_checkpoint), so a constant init cannot hide a wrong lowering.
HUB_ARCHS = ("qwen3", "phi3", "olmo2", "starcoder2", "smollm3", "gemma", "gemma2", "gemma3",
             "granite", "gpt_neox", "cohere2", "glm4", "mixtral", "qwen2_moe", "qwen3_moe",
             "gpt_oss", "deepseek_v3", "phimoe", "mpt", "llama4")
WITH_TOKENIZER = ("llama", "qwen2", "llama_wide")

# What each tested architecture exercises: README's table is rendered from this
# (architecture_table; test_hf_match checks README has it).
FEATURES = {
    "llama": ("Llama", "GQA, RoPE, SwiGLU, RMSNorm"),
    "llama_tied": ("Llama (SmolLM2 shape)", "tied embeddings, 9 query heads over 3 KV heads"),
    "mistral": ("Mistral", "GQA"),
    "qwen2": ("Qwen2", "q/k/v biases"),
    "gpt2": ("GPT-2", "learned positions, LayerNorm, GELU, Conv1D"),
    "qwen3": ("Qwen3", "q/k RMSNorm per head"),
    "phi3": ("Phi-3", "fused qkv and gate/up checkpoint tensors"),
    "olmo2": ("OLMo 2", "post-norms, q/k norms over all heads"),
    "starcoder2": ("StarCoder2", "LayerNorm with biases, GELU MLP"),
    "smollm3": ("SmolLM3", "layers without RoPE"),
    "gemma": ("Gemma", "embedding scale as a 0-dim weight, (1 + w) RMSNorm, GELU-tanh"),
    "gemma2": ("Gemma 2", "attention and logit soft-capping, sliding window, sandwich norms"),
    "gemma3": ("Gemma 3", "sliding / full layers, q/k norms, 0-dim embedding scale"),
    "granite": ("Granite", "embedding, residual, attention and logit multipliers"),
    "gpt_neox": ("GPT-NeoX", "partial RoPE, parallel residual, renamed checkpoint keys"),
    "cohere2": ("Cohere 2", "interleaved RoPE, parallel attention + MLP, sliding layers"),
    "glm4": ("GLM-4", "interleaved partial RoPE, post-norms"),
    "mixtral": ("Mixtral", "MoE: top-2 of 4 experts, renormalized; per-expert checkpoint "
                "tensors merged by transformers' converters"),
    "qwen2_moe": ("Qwen2-MoE", "MoE: top-2 of 4 without renormalization, sigmoid-gated "
                  "shared expert"),
    "qwen3_moe": ("Qwen3-MoE", "MoE: top-2 of 4, renormalized; q/k norms"),
    "deepseek_v3": ("DeepSeek-V3", "multi-head latent attention (keys of 24 channels, values "
                    "of 16), group-limited sigmoid routing with correction bias, shared "
                    "expert, dense first layer"),
    "phimoe": ("Phi-MoE", "sparsemixer routing (two masked argmax rounds), per-expert "
               "checkpoint tensors renamed and merged"),
    "llama4": ("Llama 4 (text)", "complex-number RoPE rewritten to real ops, a NoPE layer "
               "with attention temperature tuning, dense-dispatch experts (top-1 of 4, "
               "sigmoid) beside a shared MLP, chunked layers within one chunk"),
    "mpt": ("MPT", "ALiBi (eager attention recognised in the trace), 6 heads: slopes "
            "interleaved as for a non-power-of-2 count; fused Wqkv, LayerNorm without bias"),
    "gpt_oss": ("gpt-oss", "attention sinks, sliding / full layers, MoE with biased, "
                "interleaved, transposed experts and a clamped SwiGLU"),
}
BACKENDS = "reference, ONNX (CPU fast path)"


def architecture_table() -> str:
    """README's supported-architectures table, from the architectures the HF-match tests
    run (logits within 1e-4 and greedy token-exact, on each backend)."""
    rows = ["| architecture | features the tiny test model exercises | backends checked |",
            "|---|---|---|"]
    for arch in ARCHS + HUB_ARCHS:
        name, features = FEATURES[arch]
        rows.append(f"| {name} | {features} | {BACKENDS} |")
    return "\n".join(rows)


TINY_VOCAB = 320
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Fixed training text: English for the merges, plus multi-byte UTF-8 (2, 3 and 4 bytes) so that
# some characters are one token and others span several byte tokens.
CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs.
Hello, world! How are you today? I am fine, thank you. What is the capital of France?
Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.
Once upon a time there was a small engine that could run the model on the CPU.
It read the weights, planned the memory, and then it generated one token at a time.
The cat and the hat. The rain in Spain stays mainly in the plain. To be or not to be.
naïve café résumé über straße déjà vu — “quotes” … 日本語のテキスト 中文 한국어 🙂🚀 ✓ €100
"""


def make_tokenizer():
    """A deterministic byte-level BPE over CORPUS as an HF fast tokenizer with a ChatML
    template. Special tokens take ids 0-3 (<s>, </s>, <|im_start|>, <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    assert tok.get_vocab_size(with_added_tokens=True) == TINY_VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   chat_template=CHATML_TEMPLATE)


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
    if arch == "llama_wide":  # power-of-two widths, for formats that need them (fp8 groups)
        return LlamaConfig(**{**common, "hidden_size": 128, "intermediate_size": 256,
                              "num_attention_heads": 4, "num_key_value_heads": 2},
                           tie_word_embeddings=False, rope_theta=10000.0)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False, use_sliding_window=False)
    hub = _hub_config(arch, common)
    if hub is not None:
        return hub
    if arch == "gpt2":
        return GPT2Config(vocab_size=320, n_embd=72, n_layer=2, n_head=6, n_positions=256,
                          bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    raise ValueError(arch)


def _hub_config(arch: str, common: dict):
    import transformers as T

    c = {**common, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "pad_token_id": 0, "tie_word_embeddings": False}
    if arch == "qwen3":
        return T.Qwen3Config(**c, head_dim=16)
    if arch == "phi3":
        return T.Phi3Config(**c)
    if arch == "olmo2":
        return T.Olmo2Config(**c)
    if arch == "starcoder2":
        return T.Starcoder2Config(**c, sliding_window=None)
    if arch == "smollm3":  # every 2nd layer without RoPE
        return T.SmolLM3Config(**c, no_rope_layer_interval=2)
    if arch == "gemma":
        return T.GemmaConfig(**c, head_dim=16)
    if arch == "gemma2":  # soft-capped scores and logits (caps low enough to bite), windows
        return T.Gemma2Config(**c, head_dim=16, sliding_window=8, attn_logit_softcapping=4.0,
                              final_logit_softcapping=6.0,
                              layer_types=["sliding_attention", "full_attention"])
    if arch == "gemma3":  # local layers with a window of 8, shorter than the test prompts
        return T.Gemma3TextConfig(**c, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"])
    if arch == "granite":  # the four scalar multipliers
        return T.GraniteConfig(**c, embedding_multiplier=6.0, residual_multiplier=0.5,
                               attention_multiplier=0.2, logits_scaling=4.0)
    if arch == "gpt_neox":  # checkpoint key embed_out.weight for lm_head.weight
        return T.GPTNeoXConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=512, rotary_pct=0.5,
                               tie_word_embeddings=False)
    if arch == "cohere2":  # interleaved RoPE, parallel attention + MLP, sliding layers
        return T.Cohere2Config(**c, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"])
    if arch == "glm4":  # interleaved partial RoPE, post-norms
        return T.Glm4Config(**c, head_dim=16)
    if arch == "mixtral":  # 4 experts, top-2, renormalized; per-expert checkpoint tensors
        return T.MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":  # top-2 of 4 without renormalization, a gated shared expert
        return T.Qwen2MoeConfig(**c, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=48, shared_expert_intermediate_size=96,
                                norm_topk_prob=False)
    if arch == "qwen3_moe":  # top-2 of 4, renormalized, q/k norms
        return T.Qwen3MoeConfig(**c, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=48, head_dim=16, norm_topk_prob=True)
    if arch == "gpt_oss":  # sinks, sliding / full layers, biased interleaved experts with a
        # clamped SwiGLU (limit low enough to clip), router softmax over the top-2 logits
        return T.GptOssConfig(**{**c, "intermediate_size": 48}, num_local_experts=4,
                              num_experts_per_tok=2, head_dim=16, sliding_window=8,
                              swiglu_limit=1.0,
                              layer_types=["sliding_attention", "full_attention"])
    if arch == "deepseek_v3":  # MLA (LoRA'd q and kv, decoupled RoPE), a dense first layer,
        # then sigmoid routing limited to 1 of 2 expert groups, correction bias, shared expert
        return T.DeepseekV3Config(**{**c, "num_hidden_layers": 3, "num_key_value_heads": 4},
                                  n_routed_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=32,
                                  n_shared_experts=1, q_lora_rank=32, kv_lora_rank=16,
                                  qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                  first_k_dense_replace=1, n_group=2, topk_group=1,
                                  routed_scaling_factor=2.5)
    if arch == "mpt":  # ALiBi over 6 heads (MPT's slopes for a non-power-of-2 head count)
        return T.MptConfig(vocab_size=320, d_model=72, n_heads=6, n_layers=2, max_seq_len=128,
                           pad_token_id=0)
    if arch == "llama4":  # complex RoPE, a NoPE layer (every 4th) with attention temperature
        # tuning, chunked attention, dense-dispatch experts (top-1 of 4, sigmoid) + shared MLP
        return T.Llama4TextConfig(**{**c, "num_hidden_layers": 4}, num_local_experts=4,
                                  num_experts_per_tok=1, intermediate_size_mlp=128,
                                  head_dim=16, attention_chunk_size=8192)
    if arch == "phimoe":  # sparsemixer routing (top-2 by masked argmax), LayerNorm, biases
        return T.PhimoeConfig(**c, num_local_experts=4, num_experts_per_tok=2)
    return None


def make_checkpoint(arch: str, path: Path, seed: int = 0):
    """Save a seeded random model as an HF checkpoint dir; returns (dir, fp32 model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    with torch.no_grad():  # random init is small; widen it so logits are well separated
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(2.0)
            elif arch in HUB_ARCHS:  # norms and biases away from their constant init
                p.add_(torch.randn_like(p) * 0.2)
        for name, b in model.named_buffers():  # a saved router bias (DeepSeek-V3)
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.5)
    model.save_pretrained(path)
    if arch in WITH_TOKENIZER:
        make_tokenizer().save_pretrained(path)
    return path, model


def build_tiny_engine(ckpt: Path, out: Path, **options) -> Path:
    from llm_engine.builder.build import BuildOptions, build_engine

    return build_engine(BuildOptions(model=str(ckpt), output=out, max_batch_tokens=64,
                                     **options))
