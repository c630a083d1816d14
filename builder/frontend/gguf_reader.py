"""Stream tensors out of a GGUF file under their Hugging Face names, dequantized one at a time.

Only the file's memory map and one dequantized tensor are resident at once, which is what
keeps a build's peak memory near the size of the largest tensor rather than of the model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from llm_engine.builder.errors import BuildError

# GGUF tensor names of the llama family (llama, mistral, qwen2 share them) -> HF names.
_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo the row interleaving llama.cpp's converter applies to q/k projections."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFWeights:
    def __init__(self, path: Path, config) -> None:
        import gguf

        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the gguf package raises bare ValueErrors on bad files
            raise BuildError(f"{path}: not a readable GGUF file ({e})") from e
        self._quants = gguf.quants
        field = self.reader.fields.get("general.architecture")
        self.arch = bytes(field.parts[field.data[0]]).decode() if field else "?"
        if self.arch not in SUPPORTED_ARCHS:
            raise BuildError(
                f"{path}: GGUF architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHS)}); convert it to an HF checkpoint dir"
            )
        self.config = config
        self.tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self.tensors[name] = t

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        data = self._quants.dequantize(t.data, t.tensor_type)
        data = np.asarray(data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
        if self.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = self.config.num_attention_heads
            if ".k_proj." in name:
                heads = self.config.num_key_value_heads
            data = unpermute_rope(data, heads)
        return torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
