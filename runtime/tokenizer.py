"""Tokenizer, chat template and streaming detokenizer for an engine's `tokenizer/` directory.

The directory is what HF `save_pretrained` writes: tokenizer.json (the `tokenizers` model, which
is the whole encode/decode pipeline, BOS insertion included), tokenizer_config.json (special
tokens, maybe the chat template) and, in newer HF versions, chat_template.jinja. Behaviour follows
transformers 5 (`TokenizersBackend`) so that ids and rendered prompts match HF exactly, without
importing transformers: the runtime must not depend on it.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from tokenizers import Tokenizer as _Backend

REPLACEMENT_CHAR = "\ufffd"

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


class TokenizerError(ValueError):
    """The tokenizer directory or a chat template cannot be used; the message says what to do."""


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


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


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


# ----------------------------------------------------------------------- chat template env


@dataclasses.dataclass(frozen=True)
class RenderBudget:
    """Limits on one chat-template render. The checks are cooperative: every call, attribute
    or item lookup, `range` step, message-list step and output chunk of the template looks at
    the clock, so nested loops over a long conversation end at the deadline."""

    seconds: float = 2.0
    max_chars: int = 4 << 20


_BUDGET = threading.local()  # this thread's render: (deadline, seconds) or None


def _check_budget() -> None:
    limit = getattr(_BUDGET, "limit", None)
    if limit is not None and time.monotonic() > limit[0]:
        raise TokenizerError(f"the chat template took longer than its {limit[1]:g} s budget "
                             "for this conversation; send a shorter conversation")


def _render(compiled: jinja2.Template, budget: RenderBudget | None, **variables: Any) -> str:
    if budget is None:
        return compiled.render(**variables)
    _BUDGET.limit = (time.monotonic() + budget.seconds, budget.seconds)
    try:
        chunks, size = [], 0
        for chunk in compiled.generate(**variables):
            size += len(chunk)
            if size > budget.max_chars:
                raise TokenizerError(f"the chat template's output passed its budget of "
                                     f"{budget.max_chars} characters; send a shorter "
                                     "conversation")
            _check_budget()
            chunks.append(chunk)
        return "".join(chunks)
    finally:
        _BUDGET.limit = None


class _BudgetList(list):
    """A list whose iteration checks the render budget (a conversation can be long, and a
    template may loop over it inside another loop)."""

    def __iter__(self):
        for item in list.__iter__(self):
            _check_budget()
            yield item


def _budgeted_range(*args: int):
    for i in safe_range(*args):
        _check_budget()
        yield i


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_budget()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_budget()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_budget()
        return super().getitem(obj, argument)


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}` marks assistant text for training masks. We never build masks, but
    templates that use the tag must still compile, so it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot plant dunder attributes
    (the sandbox only checks reads)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Same signature trick as jinja's Namespace so that `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore attributes on a namespace ({name!r})")


class _TemplateDict:
    """`dict` for templates without exposing the dict type itself (and its class attributes)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes and takes no json.dumps options; templates written for HF
    # rely on its signature and on raw output.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _jinja_version_ok() -> bool:
    try:
        parts = tuple(int(p) for p in jinja2.__version__.split(".")[:3])
    except ValueError:
        return True  # a dev build; assume it is recent
    return parts >= (3, 1, 6)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    if not _jinja_version_ok():
        # Templates come from model repos and are untrusted; older jinja2 has sandbox escapes.
        raise TokenizerError(f"jinja2 {jinja2.__version__} has known sandbox escapes; "
                             "upgrade it with `pip install -U 'jinja2>=3.1.6'`")
    env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True,
                           extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.globals["range"] = _budgeted_range
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not compile (line {e.lineno}: "
                             f"{_one_line(e.message or e)}); fix the template") from e


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types, as HF does: rich objects carry methods
    the sandbox does not know are dangerous, so anything else becomes an inert "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())  # np.bool_(False) must not become a truthy placeholder
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


# HF copies a message's reasoning under each of these names; templates read different ones.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages: list[dict]) -> list[dict]:
    chat = []
    for message in _plain(list(messages)):
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        # APIs send content=None / tool_calls=None; templates handle a missing key, not None.
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None),
                         None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(chat: list[dict], field: bool | str, template: str) -> str | None:
    """Mark where the final message ends so the rendered text can be cut there (HF's
    continue_final_message: prefill the assistant's reply). Returns the untagged final text."""
    if not field:
        return None
    name = field if isinstance(field, str) else "content"
    last = chat[-1]
    final = last.get(name)
    if final is None:
        raise TokenizerError(f'continue_final_message: the final message has no "{name}"')
    fields = [name]
    if name in _REASONING_FIELDS:
        fields = [f for f in _REASONING_FIELDS if last.get(f) == final]
    if not any(f in template for f in fields):
        raise TokenizerError(f'continue_final_message: the chat template never reads "{name}"')
    if isinstance(final, list):
        for block in reversed(final):
            if isinstance(block, dict) and "text" in block:
                final = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                return final
        raise TokenizerError("continue_final_message: the final message has no text block")
    for f in fields:
        last[f] = last[f] + _CONTINUE_TAG
    return final


def _cut_at_final_tag(text: str, final: str) -> str:
    if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise TokenizerError("continue_final_message: the chat template dropped part of the final "
                             "message, so it cannot be continued")
    at = text.rindex(_CONTINUE_TAG.strip())
    if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()  # the template trimmed the message's trailing space


# ------------------------------------------------------------------------ streaming decode

# Tokens held back (text ending in U+FFFD) before we look for a split point directly. Valid text
# almost never needs more than 4 (one UTF-8 char); past this it is usually invalid bytes, whose
# U+FFFD will never resolve, and holding them would grow the decode window without bound.
_HOLD_LIMIT = 8


class IncrementalDetokenizer:
    """Turns generated ids into text deltas, one token at a time.

    Decoding a token alone is wrong in general: a character's UTF-8 bytes may span tokens
    (byte-level and byte-fallback vocabularies) and SentencePiece decoders strip the first token's
    leading space. So, as in vLLM / TGI, each step decodes a short window [prefix, end) and emits
    the part past the text of [prefix, read); text ending in U+FFFD is held back until the
    character completes. Windows stay a few tokens long, so a step costs O(1) amortised.

    The joined deltas (after `flush()`) equal `tokenizer.decode(output_ids)`: the same text a
    non-streaming caller gets. That is why the prompt is not used as decoding context: with it,
    SentencePiece tokenizers would stream a leading space that decode(output_ids) strips.
    `prompt_ids` is accepted for call-site compatibility with vLLM/TGI-style detokenizers.

    Exact for all input of byte-level (GPT-2 style) tokenizers and for valid text everywhere. For
    invalid bytes under a byte-fallback decoder, which replaces a whole run of byte tokens with
    U+FFFD once any of it is invalid, text already streamed cannot be taken back.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = len(prompt_ids)
        self.skip_special_tokens = skip_special_tokens
        self.output_ids: list[int] = []
        # Ids that reach the decoder: skipped special tokens are left out here (the backend would
        # drop them anyway), so a run of them cannot grow the window, and the window never starts
        # on one, which would move SentencePiece's leading-space strip onto the next token.
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (O(length) per call; the deltas are the cheap interface)."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def step(self, token_id: int) -> str:
        """Feed one generated id; return the newly completed text (often "", never a partial
        character of valid text)."""
        token_id = int(token_id)
        self.output_ids.append(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.skipped_ids:
            return ""
        ids = self._ids
        ids.append(token_id)
        window = self._decode(ids[self._prefix:])
        if not window.endswith(REPLACEMENT_CHAR):
            return self._emit(window[len(self._prefix_text):], len(ids))
        if (len(ids) - self._read) % _HOLD_LIMIT == 0:
            return self._emit_at_clean_split(window)
        return ""

    def flush(self) -> str:
        """End of output: return held-back text, including U+FFFD for an incomplete trailing
        character, so that the deltas add up to decode(output_ids)."""
        ids = self._ids
        delta = self._decode(ids[self._prefix:])[len(self._prefix_text):]
        self._prefix = self._read = len(ids)
        self._prefix_text = ""
        return self._record(delta)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, delta: str, end: int) -> str:
        # The new window starts where the emitted text did: one step of left context is enough
        # for the leading-space rule, and this keeps the window a few tokens long.
        self._prefix, self._read = self._read, end
        self._prefix_text = self._decode(self._ids[self._prefix:end])
        return self._record(delta)

    def _emit_at_clean_split(self, window: str) -> str:
        """Too many tokens held: find the last token boundary c where decoding [prefix, c) and
        [c, end) separately gives the same text as decoding the window whole. Everything before c
        is then final, even if it contains U+FFFD (invalid bytes), and the window restarts at c."""
        ids = self._ids
        for c in range(len(ids) - 1, self._read, -1):
            head = self._decode(ids[self._prefix:c])
            if head.startswith(self._prefix_text) and head + self._decode(ids[c:]) == window:
                self._prefix = self._read = c
                delta = head[len(self._prefix_text):]
                self._prefix_text = ""
                return self._record(delta)
        return ""  # no boundary is safe yet (one long character run); keep holding

    def _record(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta


__all__ = ["REPLACEMENT_CHAR", "IncrementalDetokenizer", "Tokenizer", "TokenizerError"]
