"""The request bodies of `engine serve` as pydantic models, and `validate`.

A route validates its body with `validate` (not through FastAPI's parameters, so that the size,
depth and text checks of server_guard run first) under a context holding the server's limits.
A bad body is one 400 with OpenAI's error body naming the field (`param`), not FastAPI's 422
listing them all. On the generation routes unknown fields are an error (a misspelt parameter
must not be silently ignored) and a null field is unset, since many clients send every field;
sampling values are range-checked by SamplingParams itself, so the server and the engine cannot
disagree.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from llm_engine.runtime.request import MAX_CACHE_SALT_CHARS
from llm_engine.runtime.sampling_params import SamplingParams
from llm_engine.runtime.server_protocol import ApiError, GenRequest, Limits
from llm_engine.runtime.structured.spec import (
    StructuredSpec,
    from_response_format,
    from_structured_outputs,
)
from llm_engine.runtime.tool_calls import validate_tools

# ---- field types ------------------------------------------------------------------------------

_WRONG_TYPE = "wrong_type"


def _must_be(what: str) -> WrapValidator:
    """One error saying what the field must be ("'stop' must be a string or a list of
    strings, got 1"), rather than pydantic's one per member of a union."""
    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(_WRONG_TYPE, "must be {what}", {"what": what}) from None
    return WrapValidator(check)


# Strict types (models are strict: no "1" -> 1, no true -> 1). None is only ever a default:
# the generation bodies drop null fields before validation.
Number = Annotated[Annotated[float, AllowInfNan(False)] | None, _must_be("a finite number")]
Int = Annotated[int | None, _must_be("an integer")]
Bool = Annotated[bool | None, _must_be("a boolean")]
Str = Annotated[str | None, _must_be("a string")]
Stop = Annotated[str | list[str] | None, _must_be("a string or a list of strings")]
IntList = Annotated[list[int] | None, _must_be("a list of integers")]
Object = Annotated[dict[str, Any] | None, _must_be("an object")]

# A structured-output spec (schema, regex, grammar, choices) is compiled on a worker thread and
# cached: its size bounds that work and the cache's memory, below the body limit.
MAX_STRUCTURED_BYTES = 64 << 10


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Open(BaseModel):
    """Other keys are kept (a message's name, tool_calls ...) or ignored (tokenize's)."""

    model_config = ConfigDict(strict=True, extra="allow")


# ---- chat messages ----------------------------------------------------------------------------

class TextPart(_Open):
    type: Literal["text"]
    text: str


class ChatMessage(_Open):
    """A string role and content a text model can render: a string, text parts (OpenAI's
    content parts; only text ones) or null. Its other keys go to the template as sent."""

    role: Annotated[str, _must_be("a string")]
    content: Annotated[str | list[TextPart] | None,
                       _must_be("a string or a list of text parts")] = None
    _sent: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_sent(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> ChatMessage:
        message = handler(data)
        message._sent = data
        return message

    def for_template(self) -> dict[str, Any]:
        """The message as sent (its keys in their order), with its content as one string."""
        content = self.content
        text = content if isinstance(content, str) else "".join(p.text for p in content or [])
        return {**self._sent, "content": text}


def _non_empty_list(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list")
    return value


# None in the type only for /tokenize's default: a null is refused like any non-list.
Messages = Annotated[list[ChatMessage] | None, BeforeValidator(_non_empty_list)]


# ---- the generation bodies --------------------------------------------------------------------

class StreamOptions(_Strict):
    include_usage: Annotated[bool, _must_be("a boolean")] = False
    continuous_usage_stats: Any = None  # vLLM's; accepted, not used


# Fields passed to SamplingParams as sent (when sent), to be checked by it.
_SAMPLING = {"temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
             "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos",
             "min_tokens", "skip_special_tokens", "include_stop_str_in_output"}


class _GenBody(_Strict):
    """Fields both generation routes take."""

    model: Str = None
    user: Str = None
    temperature: Number = None
    top_p: Number = None
    top_k: Int = None
    min_p: Number = None
    seed: Int = None
    stop: Stop = None
    stop_token_ids: IntList = None
    presence_penalty: Number = None
    frequency_penalty: Number = None
    repetition_penalty: Number = None
    ignore_eos: Bool = None
    min_tokens: Int = None
    skip_special_tokens: Bool = None
    include_stop_str_in_output: Bool = None
    max_tokens: Int = None
    n: Int = 1
    stream: Bool = False
    stream_options: StreamOptions | None = None  # after stream: its check reads stream
    cache_salt: Str = None  # vLLM's: prefix-cache blocks shared only within a salt
    response_format: Object = None  # OpenAI's: text, json_object or json_schema
    structured_outputs: Object = None  # vLLM's: json, regex, choice, grammar or json_object

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """A null known field is left out (its default); an unknown one is still an error."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    @field_validator("n")
    @classmethod
    def _n_within_limit(cls, n: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_n
        if not 1 <= n <= limit:
            raise ValueError(f"n must be in [1, {limit}], got {n}")
        return n

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, opts: StreamOptions | None,
                             info: ValidationInfo) -> StreamOptions | None:
        if opts is not None and opts.model_fields_set and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return opts

    @field_validator("cache_salt")
    @classmethod
    def _salt_length(cls, salt: str | None) -> str | None:
        if salt is not None and not 0 < len(salt) <= MAX_CACHE_SALT_CHARS:
            raise ValueError(f"cache_salt must be 1 to {MAX_CACHE_SALT_CHARS} characters")
        return salt

    def _sampling(self, max_tokens: int | None, logprobs: int | None,
                  prompt_logprobs: int | None) -> SamplingParams:
        fields = self.model_dump(include=_SAMPLING, exclude_unset=True)
        structured = self._structured()
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs, structured=structured,
                                  **fields)
        except ValueError as e:  # SamplingParams names the field first: reuse it as param
            raise ApiError(400, str(e), param=str(e).split()[0]) from None

    def _structured(self) -> StructuredSpec | None:
        """response_format or structured_outputs (not both) as a spec; a 400 naming the
        problem for one that is too large or malformed."""
        sent = [(name, value) for name, value in (("response_format", self.response_format),
                                                  ("structured_outputs",
                                                   self.structured_outputs))
                if value is not None]
        if not sent:
            return None
        if len(sent) > 1:
            raise ApiError(400, "send response_format or structured_outputs, not both",
                           param="structured_outputs")
        (name, value), = sent
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass"))
        if size > MAX_STRUCTURED_BYTES:
            raise ApiError(400, f"{name} is {size} bytes of JSON, over the server's limit of "
                                f"{MAX_STRUCTURED_BYTES}", param=name)
        parse = from_response_format if name == "response_format" else from_structured_outputs
        try:
            return parse(value)
        except ValueError as e:  # the parsers name the field and the problem
            raise ApiError(400, str(e)[:500], param=name) from None

    def _request(self, prompt: str | list[int] | None, messages: list[dict[str, Any]] | None,
                 params: SamplingParams, echo: bool, logprobs: int | None) -> GenRequest:
        usage = self.stream_options.include_usage if self.stream_options else False
        return GenRequest(prompt, messages, params, self.n, self.stream, usage, echo,
                          logprobs, self.cache_salt)


def _logprobs_within_limit(value: int | None, info: ValidationInfo) -> int | None:
    limit = _limits(info).max_logprobs
    if value is not None and not 0 <= value <= limit:
        raise ValueError(f"logprobs must be in [0, {limit}], got {value}")
    return value


def _one_prompt(value: Any) -> str | list[int]:
    """A string or token ids; a list holding one of those is accepted too (one prompt)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ValueError("prompt is empty")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int)
                                                 and not isinstance(t, bool) for t in value):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str | list)
                                                          for p in value):
        raise ValueError("one prompt per request: send several requests (they are batched "
                         "together)")
    if isinstance(value, list) and not value:
        raise ValueError("prompt is empty")
    raise ValueError("prompt must be a string or a list of token ids")


class CompletionRequest(_GenBody):
    """POST /v1/completions."""

    prompt: Annotated[str | list[int], BeforeValidator(_one_prompt)]
    echo: Bool = False
    logprobs: Int = None  # top-N per token
    max_tokens: Int = 16

    _logprobs = field_validator("logprobs")(_logprobs_within_limit)

    def to_request(self) -> GenRequest:
        lp = self.logprobs
        prompt_lp = lp if self.echo and lp is not None else None
        if self.max_tokens == 0:  # the scoring call: the echoed prompt (and its logprobs) only
            self._check_scoring()
            prompt_lp = lp if lp is not None else 0  # the engine's prompt-only mode needs it
        params = self._sampling(self.max_tokens, lp, prompt_lp)
        return self._request(self.prompt, None, params, bool(self.echo), lp)

    def _check_scoring(self) -> None:
        """max_tokens: 0 generates nothing, so it only makes sense echoing the prompt, and
        the prompt's logprobs come back in the whole response only."""
        if not self.echo:
            raise ApiError(400, "max_tokens: 0 generates nothing, so there is nothing to "
                                "return without echo: true (send echo: true and logprobs to "
                                "score the prompt)", param="max_tokens")
        if self.stream:
            raise ApiError(400, "max_tokens: 0 with echo (scoring the prompt) is not "
                                "streamed: send stream: false", param="stream")


class ChatRequest(_GenBody):
    """POST /v1/chat/completions."""

    messages: Messages
    logprobs: Bool = False
    top_logprobs: Int = None  # after logprobs: its check reads it
    max_completion_tokens: Int = None  # OpenAI's newer name for max_tokens; wins if both
    tools: Any = None  # checked by tool_calls.validate_tools
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return _logprobs_within_limit(top, info)

    def to_request(self) -> GenRequest:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        tools = self._tools()
        params = self._sampling(max_tokens, logprobs, None)
        if tools is not None and tools.constrained and params.structured is not None:
            raise ApiError(400, "tool_choice \"required\" or a named function forces a tool "
                                "call, which cannot be combined with response_format or "
                                "structured_outputs", param="tool_choice")
        messages = [m.for_template() for m in self.messages or []]
        req = self._request(None, messages, params, False, logprobs)
        req.tools = tools
        return req

    def _tools(self) -> Any:
        """tools / tool_choice / parallel_tool_calls as a ToolConfig (None when none was sent);
        a 400 naming the field at fault."""
        if self.tools is None and self.tool_choice is None and self.parallel_tool_calls is None:
            return None
        try:
            return validate_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        except ValueError as e:  # the message starts with the field: tools[0]..., tool_choice
            field = re.match(r"\w*", str(e)).group() or "tools"
            raise ApiError(400, str(e)[:500], param=field) from None


# ---- the token routes -------------------------------------------------------------------------

def _non_empty_string(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise ValueError("prompt must be a non-empty string")
    return value


class TokenizeRequest(_Open):
    """POST /tokenize: exactly one of prompt or messages (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    prompt: Annotated[str | None, BeforeValidator(_non_empty_string)] = None
    messages: Messages = None

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, data: Any) -> Any:
        if not isinstance(data, dict) or len(set(data) & {"prompt", "messages"}) != 1:
            raise ValueError('send {"prompt": "..."} or {"messages": [...]}')
        return data


class DetokenizeRequest(_Open):
    """POST /detokenize: token ids in [0, vocab_size) (vocab_size from the context; other
    fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    tokens: list[int] = Field(default=None, validate_default=True)  # absent: a bad list

    @model_validator(mode="before")
    @classmethod
    def _fields(cls, data: Any) -> Any:
        return data if isinstance(data, dict) else {}  # a body that is no object has no tokens

    @field_validator("tokens", mode="before")
    @classmethod
    def _ids(cls, tokens: Any, info: ValidationInfo) -> Any:
        vocab = (info.context or {})["vocab_size"]
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                for t in tokens):
            raise ValueError(f"tokens must be a list of ids in [0, {vocab})")
        return tokens


# ---- validation errors ------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)
# Which error of several a client hears first, as before the models: unknown fields, then
# wrong types, then missing fields (each of these top-level only), then the rest; ties go to
# the field sent first.
_PHASE = {"extra_forbidden": 0, _WRONG_TYPE: 1, "model_type": 1, "missing": 2}


def validate(model: type[M], body: Any, **context: Any) -> M:
    """`body` as `model`, or a 400 ApiError naming the field that is wrong (`param`)."""
    try:
        return model.model_validate(body, context=context)
    except ValidationError as e:
        raise _api_error(e.errors(include_url=False), body) from None


def _path(loc: tuple[int | str, ...]) -> str:
    """("messages", 0, "content") -> "messages[0].content"."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _api_error(errors: list[Any], body: Any) -> ApiError:
    order = {k: i for i, k in enumerate(body)} if isinstance(body, dict) else {}

    def rank(e: Any) -> tuple[int, int]:
        loc = e["loc"]
        phase = _PHASE.get(e["type"], 3) if len(loc) == 1 else 3
        return phase, order.get(loc[0], len(order)) if loc else -1

    e = min(errors, key=rank)
    loc, kind = e["loc"], e["type"]
    if not loc:
        message = str(e["ctx"]["error"]) if kind == "value_error" else \
            "the request body must be a JSON object"
        return ApiError(400, message)
    if kind == "extra_forbidden":
        names = sorted(str(x["loc"][-1]) for x in errors
                       if x["type"] == kind and x["loc"][:-1] == loc[:-1])
        if len(loc) == 1:
            return ApiError(400, f"unknown or unsupported field(s): {', '.join(names)}",
                            param=names[0])
        message = f"unknown {_path(loc[:-1])} field(s): {', '.join(names)}"
    elif kind == "value_error":  # our validators' own sentences
        message = str(e["ctx"]["error"])
    elif kind == "missing":
        message = f"{_path(loc)} is required"
    elif kind in (_WRONG_TYPE, "model_type"):
        what = e["msg"] if kind == _WRONG_TYPE else "must be an object"
        message = f"'{_path(loc)}' {what}, got {e['input']!r}" if len(loc) == 1 else \
            f"{_path(loc)} {what}"
    else:
        message = f"'{_path(loc)}': {e['msg']}"
    return ApiError(400, message[:300], param=str(loc[0]))
