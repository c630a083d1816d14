"""The examples run against a tiny engine: the FastAPI service embedding AsyncEngine, the
JSONL scoring job (checked against HF's log-probabilities of the same tokens) and the
terminal chat with piped input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import torch
import uvicorn

from tests.scripts import load_script
from tests.server_harness import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_fastapi_app(engines):
    create_app = load_script("examples/fastapi_app.py").create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(str(engines("llama"))), port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/healthz").json() == {"ok": True}
        r = httpx.post(url + "/summarize", json={"text": "The cat sat on the mat.",
                                                 "max_words": 5}, timeout=60)
        assert r.status_code == 200 and r.json()["tokens"] > 0
        assert httpx.post(url + "/summarize", json={"text": " "}).status_code == 400
    finally:
        server.should_exit = True
        thread.join(10)


def test_score_jsonl_matches_hf_logprobs(engines, checkpoints, tmp_path):
    score = load_script("examples/score_jsonl.py").score
    from llm_engine.runtime.tokenizer import Tokenizer

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    texts = ["Hello world, this is a test.", "Another line of text here", "short"]
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert score(str(engines("llama")), str(src), str(dst)) == 3
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    _, hf = checkpoints("llama")
    tok = Tokenizer.load(engines("llama") / "tokenizer")
    for row, text in zip(rows, texts):
        ids = tok.encode(text)
        assert row["tokens"] == len(ids) and row["text"] == text
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        want = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
        assert abs(row["mean_logprob"] - want) < 1e-3, (row, want)


def test_chat_terminal_with_piped_input(engines):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "chat_terminal.py"),
                             str(engines("llama"))], input="Hello\nHow are you?\n\n",
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.split("bot> ")[1:]]
    assert len(replies) == 2 and all(r.strip() for r in replies)
