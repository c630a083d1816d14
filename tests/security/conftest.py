"""A live `engine serve` on a tiny engine, with the server options an attack test needs."""

from __future__ import annotations

import pytest

from llm_engine.runtime import AsyncEngine
from llm_engine.runtime.server import ServerConfig
from tests.server_harness import LiveServer, tiny_engine


@pytest.fixture(scope="module")
def serve_tiny(engines):
    """serve_tiny(engine=None, **ServerConfig options) -> LiveServer, stopped with the module."""
    started: list[tuple[LiveServer, AsyncEngine]] = []

    def start(engine=None, **options) -> LiveServer:
        ae = AsyncEngine(engine if engine is not None else tiny_engine(engines))
        srv = LiveServer(ae, ServerConfig(model_name="tiny", **options))
        started.append((srv, ae))
        return srv

    yield start
    for srv, ae in started:
        srv.stop()
        ae.shutdown()
