"""Tokenizer for an engine's `tokenizer/` directory.

The directory is what HF `save_pretrained` writes: tokenizer.json (the `tokenizers` model, which
is the whole encode/decode pipeline, BOS insertion included), tokenizer_config.json (special
tokens, maybe the chat template) and, in newer HF versions, chat_template.jinja. Behaviour follows
transformers 5 (`TokenizersBackend`) so that ids and rendered prompts match HF exactly, without
importing transformers: the runtime must not depend on it.

Chat templates render in chat_template.py (sandboxed, under a budget); streamed output is
decoded by detokenizer.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

from llm_engine.runtime.chat_template import (
    RenderBudget,
    _BudgetList,
    _compile,
    _cut_at_final_tag,
    _normalize_messages,
    _plain,
    _render,
    _tag_final_message,
)
from llm_engine.runtime.tokenizer_errors import TokenizerError, _one_line

# HF's named special-token attributes, in HF's order (all_special_ids keeps it).
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                   "mask_token")

# End-of-turn markers of common chat formats. A model can end its turn with one of these even when
# tokenizer_config names another eos (SmolLM2: eos <|im_end|>, but <|endoftext|> ends documents),
# so generation should stop on any that this vocabulary has as a special token (llama.cpp's EOG).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>",
                       "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|return|>", "<|call|>",
                       "<｜end▁of▁sentence｜>", "<|END_OF_TURN_TOKEN|>", "<EOT>", "</s>", "<eos>")

_FIX = "rebuild the engine with `engine build` (or re-save the tokenizer with HF save_pretrained)"


# ----------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({_one_line(e)}); {_FIX}") from e


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} cannot be read ({_one_line(e)}); {_FIX}") from e



def _token_content(value: Any) -> str | None:
    # Old configs store special tokens as serialized AddedToken dicts rather than strings.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _templates_from_list(entries: Any, source: Path) -> dict[str, str]:
    if not all(isinstance(t, Mapping) and isinstance(t.get("name"), str)
               and isinstance(t.get("template"), str) for t in entries):
        raise TokenizerError(f"{source}: chat_template list entries must be "
                             '{"name": ..., "template": ...} objects; fix the file or ' + _FIX)
    return {t["name"]: t["template"] for t in entries}


def _load_chat_templates(path: Path, config: Mapping[str, Any]) -> tuple[str | dict[str, str] | None,
                                                                         Path | None]:
    """The template(s) and the file they came from. Newest HF layout wins, as HF loads it: .jinja
    files override tokenizer_config.json's "chat_template"."""
    templates: dict[str, str] = {}
    source: Path | None = None
    default_file = path / "chat_template.jinja"
    if default_file.is_file():
        templates["default"] = _read_text(default_file)
        source = default_file
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = _read_text(f)
            source = source or f
    if templates:
        if list(templates) == ["default"]:
            return templates["default"], source
        return templates, source

    json_file = path / "chat_template.json"
    if json_file.is_file():
        raw, source = _read_json(json_file), json_file
        value = raw.get("chat_template") if isinstance(raw, Mapping) else None
    else:
        value, source = config.get("chat_template"), path / "tokenizer_config.json"
    if value is None:
        return None, None
    if isinstance(value, str):
        return value, source
    if isinstance(value, list):
        return _templates_from_list(value, source), source
    if isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values()):
        return dict(value), source
    raise TokenizerError(f'{source}: "chat_template" must be a string or a list of '
                         f'{{"name", "template"}} objects; fix the file or {_FIX}')


@dataclasses.dataclass
class Tokenizer:
    """An engine's tokenizer. Build it with `Tokenizer.load(dir)`."""

    path: Path
    backend: _Backend
    # Named special tokens present in the config (bos_token, eos_token, ...): the template sees them.
    special_tokens: dict[str, str]
    extra_special_tokens: list[str]
    chat_template: str | dict[str, str] | None
    chat_template_source: Path | None
    # Ids the backend drops when decoding with skip_special_tokens (added tokens marked special).
    skipped_ids: frozenset[int]

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: no tokenizer directory here; {_FIX}")
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{tok_file} is missing (only the fast tokenizers format is "
                                 f"supported); {_FIX}")
        try:
            backend = _Backend.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises bare Exception for parse errors
            raise TokenizerError(f"{tok_file} is corrupt or not a tokenizers file "
                                 f"({_one_line(e)}); {_FIX}") from e

        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, Mapping):
            raise TokenizerError(f"{config_file} must hold a JSON object; {_FIX}")
        # Pre-v4.40 saves kept special tokens in their own file; the config wins when both do.
        map_file = path / "special_tokens_map.json"
        token_map = _read_json(map_file) if map_file.is_file() else {}
        if not isinstance(token_map, Mapping):
            raise TokenizerError(f"{map_file} must hold a JSON object; {_FIX}")
        merged = {**token_map, **config}

        special_tokens = {}
        for name in _NAMED_SPECIALS:
            content = _token_content(merged.get(name))
            if content is not None:
                special_tokens[name] = content
        # HF 5 calls them extra_special_tokens (a list, or a name -> token dict); HF 4 said
        # additional_special_tokens.
        extra = merged.get("extra_special_tokens") or merged.get("additional_special_tokens")
        if isinstance(extra, Mapping):
            extra = list(extra.values())
        extra_tokens = [c for c in map(_token_content, extra) if c is not None] \
            if isinstance(extra, list) else []

        # BOS/EOS insertion is left to tokenizer.json's post-processor: HF 5 drops the config's
        # add_bos_token/add_eos_token whenever tokenizer.json exists, and HF 4 had already written
        # their effect into the post-processor before save_pretrained serialized it.
        # Special-token text in input is matched as the token unless the config asks otherwise.
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

        chat_template, source = _load_chat_templates(path, config)
        skipped = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        return cls(path, backend, special_tokens, extra_tokens, chat_template, source, skipped)

    # ---------------------------------------------------------------------- special tokens

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the configured eos first, then the end-of-turn special tokens
        this vocabulary has (see _END_OF_TURN_TOKENS)."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        for token in _END_OF_TURN_TOKENS:
            i = self.backend.token_to_id(token)
            if i is not None and i in self.skipped_ids and i not in ids:
                ids.append(i)
        return tuple(ids)

    @property
    def all_special_ids(self) -> list[int]:
        """Named special tokens then extra special tokens, deduplicated (HF's order)."""
        out: list[int] = []
        for token in [*self.special_tokens.values(), *self.extra_special_tokens]:
            i = self.backend.token_to_id(token)
            if i is not None and i not in out:
                out.append(i)
        return out

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (HF's `len(tokenizer)`): the size a logits
        row must cover."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    # ---------------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(_id_list(ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------- chat template

    def get_chat_template(self, chat_template: str | None = None,
                          tools: list[dict] | None = None) -> str:
        """Pick the template the way HF does: an explicit template string or template name, else
        "tool_use" when tools are given and it exists, else "default"."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise TokenizerError(f"{self.chat_template_source} has several chat templates "
                                 f"({', '.join(sorted(templates))}) and none named 'default'; "
                                 "pass chat_template=<name>")
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise TokenizerError(f"{self.path} has no chat template (looked for "
                                 "chat_template.jinja, chat_template.json and tokenizer_config.json "
                                 "'chat_template'); use a chat/instruct model or pass "
                                 "chat_template=<jinja source>, or send plain prompts")
        return templates

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, tools: list[dict] | None = None, *,
                            documents: list[dict] | None = None,
                            chat_template: str | None = None,
                            continue_final_message: bool | str = False,
                            budget: RenderBudget | None = None,
                            **kwargs: Any) -> str | list[int]:
        """Render `messages` like HF `apply_chat_template`; extra kwargs become template
        variables. With tokenize=True the ids are those of the rendered text with no special
        tokens added: the template already wrote BOS if the model wants it. `budget`: stop a
        render past this much time or output (TokenizerError), as a server must for
        templates and conversations it did not write."""
        template = self.get_chat_template(chat_template, tools)
        compiled = _compile(template)
        if not messages:
            raise TokenizerError("cannot apply a chat template to an empty conversation; pass at "
                                 "least one message")
        if continue_final_message and add_generation_prompt:
            raise TokenizerError("continue_final_message and add_generation_prompt exclude each "
                                 "other; pass add_generation_prompt=False to continue a message")
        chat = _normalize_messages(messages)
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TypeError("tools must be JSON-schema dicts (function objects are not converted "
                            "here; use transformers.utils.get_json_schema first)")
        final = _tag_final_message(chat, continue_final_message, template)
        variables = {**self.special_tokens, **_plain(kwargs)}  # kwargs override special tokens
        text = _render(compiled, budget, messages=_BudgetList(chat), tools=_plain(tools),
                       documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                       **variables)
        if final is not None:
            text = _cut_at_final_tag(text, final)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _id_list(ids: Sequence[int]) -> list[int]:
    # tokenizers wants a list of Python ints; tensors and arrays iterate as 0-d objects.
    tolist = getattr(ids, "tolist", None)
    return tolist() if tolist is not None else [int(i) for i in ids]


__all__ = ["Tokenizer"]
