"""A multi-rank engine on one host keeps its rendezvous store on loopback: torch's TCPStore
given 127.0.0.1 still listened on every interface, where any client could read and write the
ranks' keys (or fill the store)."""

from __future__ import annotations

import psutil

from llm_engine.runtime import Engine
from tests.models import build_tiny_engine


def test_the_store_listens_on_loopback_only(checkpoints, tmp_path):
    ckpt, _ = checkpoints("llama")
    engine = Engine.load(build_tiny_engine(ckpt, tmp_path / "tp2", tp=2), block_size=4,
                         kv_cache_memory=1 << 20)
    try:
        port = engine.cluster.store.port
        listening = [c.laddr for c in psutil.Process().net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        assert engine.generate([[5, 6, 7]])[0].token_ids  # and the ranks still meet there
    finally:
        engine.close()
