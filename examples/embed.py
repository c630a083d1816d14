"""Embed an engine in your own program: batch generation, streaming, and asyncio clients.

    engine build --model smollm2 --output engines/smollm2
    python examples/embed.py engines/smollm2
"""

from __future__ import annotations

import asyncio
import sys

from llm_engine import AsyncEngine, Engine, SamplingParams


def main(path: str) -> None:
    engine = Engine.load(path, kv_cache_memory=256 << 20)
    questions = ["What is the capital of France?", "Name three primary colors.",
                 "What does a hash table do?"]
    prompts = [engine.apply_chat_template([{"role": "user", "content": q}]) for q in questions]

    # Many prompts at once: one in-flight batch, outputs in prompt order.
    for q, out in zip(questions, engine.generate(prompts, SamplingParams(temperature=0,
                                                                        max_tokens=40))):
        print(f"Q: {q}\nA: {out.text.strip()}  [{out.finish_reason}]\n")

    # Streaming one request.
    for delta in engine.stream(prompts[0], SamplingParams(temperature=0.7, seed=7,
                                                          max_tokens=40)):
        print(delta.delta_text, end="", flush=True)
    print("\n")

    # asyncio: concurrent clients share the batch; each gets its own stream.
    async def clients() -> None:
        aengine = AsyncEngine(engine)

        async def ask(p: str) -> str:
            out = await aengine.complete(p, SamplingParams(temperature=0, max_tokens=24))
            return out.text.strip()

        answers = await asyncio.gather(*(ask(p) for p in prompts))
        for q, a in zip(questions, answers):
            print(f"[async] {q} -> {a}")
        aengine.shutdown()

    asyncio.run(clients())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "engines/smollm2")
