"""The error that tokenizer loading and chat-template rendering both raise.

Its own module so that chat_template.py can raise it without importing tokenizer.py, which imports
chat_template.py.
"""

from __future__ import annotations


class TokenizerError(ValueError):
    """The tokenizer directory or a chat template cannot be used; the message says what to do."""


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


__all__ = ["TokenizerError"]
