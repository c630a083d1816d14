"""Your own FastAPI service with the engine inside it (no `engine serve`): one engine loaded at
startup, shared by every request through AsyncEngine, closed at shutdown.

    engine build --model smollm2 --output engines/smollm2
    ENGINE_DIR=engines/smollm2 uvicorn fastapi_app:app --app-dir examples --port 8080
    curl -s localhost:8080/summarize -H 'content-type: application/json' \
        -d '{"text": "The cat sat on the mat all day long."}'
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from llm_engine import AsyncEngine, SamplingParams


class Document(BaseModel):
    text: str
    max_words: int = 30


def create_app(engine_dir: str) -> FastAPI:
    state: dict[str, AsyncEngine] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state["engine"] = AsyncEngine.load(engine_dir, kv_cache_memory=256 << 20)
        yield
        state["engine"].shutdown()  # stops the engine loop (and any rank workers)

    app = FastAPI(lifespan=lifespan)

    @app.post("/summarize")
    async def summarize(doc: Document) -> dict:
        engine = state["engine"]
        if not doc.text.strip():
            raise HTTPException(400, "text is empty")
        prompt = engine.engine.apply_chat_template([{
            "role": "user",
            "content": f"Summarize in at most {doc.max_words} words:\n\n{doc.text}"}])
        out = await engine.complete(prompt, SamplingParams(temperature=0,
                                                           max_tokens=2 * doc.max_words))
        return {"summary": out.text.strip(), "tokens": len(out.token_ids),
                "finish_reason": out.finish_reason}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": state["engine"].alive}

    return app


app = create_app(os.environ["ENGINE_DIR"]) if "ENGINE_DIR" in os.environ else None
