"""A streaming chat in the terminal: each reply is printed as it is generated, and the
conversation so far is the next prompt (the prefix cache makes re-sending it cheap). Reads
lines from stdin, so it also runs with piped input; an empty line or EOF ends it.

    python examples/chat_terminal.py engines/smollm2
"""

from __future__ import annotations

import sys

from llm_engine import Engine, SamplingParams


def chat(engine_dir: str, max_tokens: int = 128) -> None:
    engine = Engine.load(engine_dir, kv_cache_memory=256 << 20)
    messages: list[dict[str, str]] = []
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=0, max_tokens=max_tokens)
    while True:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        print("bot> ", end="", flush=True)
        reply = ""
        for out in engine.stream(engine.apply_chat_template(messages), params):
            print(out.delta_text, end="", flush=True)
            reply = out.text
        print()
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/chat_terminal.py ENGINE_DIR")
    chat(sys.argv[1])
