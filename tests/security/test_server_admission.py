"""The concurrency limit against clients that send their headers, stall, then send their
bodies: the check used to come before the body and the slot after tokenization, so 8 of 8
such clients got in with a limit of 1. Now the slot is taken at the check and the body has a
deadline, after which a stalled client gets 408 and its slot back."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import httpx2 as httpx
import pytest

BODY = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()


@pytest.fixture(scope="module")
def live(serve_tiny):
    return serve_tiny(max_concurrent_requests=1, body_timeout=1.0)


def _open(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n")
    return s


def _status(s: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_stalled_bodies_do_not_bypass_the_limit(live):
    socks = [_open(live.port)]
    time.sleep(0.2)  # the first one holds the slot while it stalls
    socks += [_open(live.port) for _ in range(7)]
    time.sleep(0.2)
    for s in socks:
        with contextlib.suppress(OSError):  # a rejected client's connection may be closed
            s.sendall(BODY)
    statuses = [_status(s) for s in socks]
    for s in socks:
        s.close()
    assert statuses[0] == 200 and statuses[1:] == [429] * 7, statuses


def test_a_body_that_never_comes_is_a_408_and_frees_the_slot(live):
    s = _open(live.port)
    start = time.monotonic()
    assert _status(s) == 408
    assert time.monotonic() - start < 10
    s.close()
    r = httpx.post(live.url + "/v1/completions", content=BODY,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text
