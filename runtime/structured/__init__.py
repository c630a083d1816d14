"""Structured outputs: constrain sampling to a JSON schema, regex, choice list or grammar.

spec.py parses what a request asks for, compiler.py turns it into a grammar for the engine's
tokenizer off the engine thread (cached), matcher.py masks each step's logits and follows the
sampled tokens. The grammar engine is llguidance (docs/structured.md has the measurements).
runtime.engine compiles a request's grammar off-thread, admits it when ready and masks its rows.
"""

from llm_engine.runtime.structured.compiler import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarTokenizer,
    grammar_tokenizer,
)
from llm_engine.runtime.structured.matcher import (
    Matcher,
    allocate_bitmask,
    apply_bitmask,
    apply_masks,
    fill_bitmasks,
)
from llm_engine.runtime.structured.spec import (
    StructuredSpec,
    from_response_format,
    from_structured_outputs,
)

__all__ = [
    "CompiledGrammar", "GrammarCompiler", "GrammarTokenizer", "Matcher", "StructuredSpec",
    "allocate_bitmask", "apply_bitmask", "apply_masks", "fill_bitmasks", "from_response_format",
    "from_structured_outputs", "grammar_tokenizer",
]
