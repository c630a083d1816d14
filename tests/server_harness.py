"""A live `engine serve` for tests: the app (runtime.server) on uvicorn in a thread of the test
process, over an AsyncEngine on the tiny llama engine."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from llm_engine.runtime import AsyncEngine, Engine
from llm_engine.runtime.server import ServerConfig, create_app

# The options test_server's main server runs with (other modules share its fixtures' shape).
TINY_SERVER = dict(max_n=4, max_logprobs=5, max_body_bytes=4096)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, ae: AsyncEngine, config: ServerConfig) -> None:
        self.ae = ae
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        uv = uvicorn.Config(create_app(ae, config), host="127.0.0.1", port=self.port,
                            log_level="warning", access_log=False)
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def tiny_engine(engines) -> Engine:
    return Engine.load(engines("llama"), block_size=4, kv_cache_memory=4 << 20)


def serve(engines, engine: Engine | None = None, **config) -> Iterator[LiveServer]:
    """A fixture body: a LiveServer on `engine` (default: a fresh tiny engine) with
    ServerConfig(model_name="tiny", **config), stopped with its engine afterwards."""
    ae = AsyncEngine(engine if engine is not None else tiny_engine(engines))
    srv = LiveServer(ae, ServerConfig(model_name="tiny", **config))
    yield srv
    srv.stop()
    ae.shutdown()


def metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in /metrics")
