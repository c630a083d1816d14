"""Tool calling: request validation, chat-template inputs, output parsers and constrained grammars.

The building blocks for OpenAI `tools` / `tool_choice` / `parallel_tool_calls` in chat
completions (docs/tool-calling.md), used by `engine serve` (runtime/server.py).

* `validate_tools(tools, tool_choice, parallel_tool_calls) -> ToolConfig`: bounds and shapes,
  ValueError naming the offending field.
* `chat_template_inputs(messages, config, parser)`: the `tools` template variable as HF
  templates expect it, and messages with `tool_calls` / `tool` roles normalised for templates.
* Parsers for the model's reply, one per format (`hermes`, `llama3`, `mistral`): whole-text
  (`parse_tool_calls`) and streaming (`StreamingToolParser`), sharing one code path so both
  agree on every well-formed output. `max_calls=1` (parallel_tool_calls false) keeps the first
  call and drops the rest of the reply.
* `detect_parser(chat_template)`: the format from markers in the model's template;
  `detect_mistral_style` tells Mistral's two call formats apart.
* `constrained_grammar(config, parser)`: a llguidance Lark grammar that forces a call (for
  tool_choice "required" or a named function) with arguments held to each function's schema.
* `single_call_stop(config, parser)`: a stop string that ends generation after the first call
  where the format has one.

Modules: config (validation), template (template inputs), detect, stream (call types, the JSON
scanner, the shared streaming parser), formats (one parser per format), grammar.
"""

from llm_engine.runtime.tool_calls.config import (
    MAX_PARAMETERS_BYTES,
    MAX_TOOLS,
    PARSERS,
    ToolConfig,
    new_call_id,
    validate_tools,
)
from llm_engine.runtime.tool_calls.detect import (
    MISTRAL_STYLES,
    detect_mistral_style,
    detect_parser,
)
from llm_engine.runtime.tool_calls.formats import (
    HermesParser,
    Llama3Parser,
    MistralParser,
    parse_hermes,
    parse_llama3,
    parse_mistral,
    parse_tool_calls,
    streaming_parser,
)
from llm_engine.runtime.tool_calls.grammar import constrained_grammar, single_call_stop
from llm_engine.runtime.tool_calls.stream import (
    StreamDelta,
    StreamingToolParser,
    ToolCall,
    ToolCallDelta,
)
from llm_engine.runtime.tool_calls.template import chat_template_inputs

__all__ = [
    "MAX_PARAMETERS_BYTES", "MAX_TOOLS", "MISTRAL_STYLES", "PARSERS", "HermesParser",
    "Llama3Parser", "MistralParser", "StreamDelta", "StreamingToolParser", "ToolCall",
    "ToolCallDelta", "ToolConfig", "chat_template_inputs", "constrained_grammar",
    "detect_mistral_style", "detect_parser", "new_call_id", "parse_hermes", "parse_llama3",
    "parse_mistral", "parse_tool_calls", "single_call_stop", "streaming_parser",
    "validate_tools",
]
