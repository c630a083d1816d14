"""The control channel between rank 0 and the other ranks of a multi-rank engine: its
messages, how they are encoded as tensors, and how they are sent and awaited.

Messages travel as broadcasts on the control process group (gloo, CPU tensors; built by
runtime.cluster). Nothing is pickled: JSON travels as bytes in a uint8 tensor, step inputs as
one int64 tensor after a small header. Handshake reports wait long (a rank may be checksumming
a big shard), workers wait for the next step without limit; everything else has the collective
timeout.

Handshake: rank 0 broadcasts HELLO (engine.json digest, device, the whole EngineConfig, plan
input names); every rank loads and verifies its own files and all ranks exchange a JSON report
(KV-cache blocks its budget holds, or its error); every rank takes the smallest block count, so
block ids mean the same on all ranks; a second report round says each rank has allocated.
Then each step: header [STEP, num_copies, the feeds' shapes] and one int64 payload (the feeds in
plan-input order, then the copy-on-write block pairs); SHUTDOWN ends the workers' loop.

Kept in one module because both ends must agree on every byte: rank 0 (runtime.cluster,
runtime.executor) encodes, runtime.worker decodes.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import torch
import torch.distributed as dist

PROTOCOL = 1
# MICRO: a pipeline micro-batch whose step continues with more MICROs and a final STEP.
HELLO, STEP, SHUTDOWN, MICRO = 1, 2, 3, 4
REPORT_BYTES = 8192  # one rank's handshake report (JSON), zero-padded
LOAD_TIMEOUT = datetime.timedelta(minutes=30)  # loading + checksumming a large shard
IDLE_TIMEOUT = datetime.timedelta(days=365)  # workers wait this long between steps


def broadcast(group: Any, tensor: torch.Tensor, timeout: datetime.timedelta | None = None,
              root: int = 0) -> None:
    """`timeout` overrides the group's for this call."""
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    if timeout is not None:
        opts.timeout = timeout
    group.broadcast([tensor], opts).wait()


def json_tensor(obj: Any, size: int | None = None) -> torch.Tensor:
    data = json.dumps(obj).encode()
    if size is not None and len(data) > size:
        raise ValueError(f"handshake message of {len(data)} bytes exceeds {size}")
    buf = torch.zeros(size or len(data), dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf


def json_from_tensor(buf: torch.Tensor) -> Any:
    return json.loads(bytes(buf.tolist()).rstrip(b"\0"))


def encode_step(input_names: list[str], feeds: dict[str, torch.Tensor],
                copies: list[tuple[int, int]], command: int = STEP
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) for a step: shapes of the feeds in plan-input order, then all of
    them and the copy pairs flattened into one int64 tensor."""
    header = [command, len(copies)]
    parts = []
    for name in input_names:
        t = feeds[name]
        if t.is_floating_point() or t.dim() > 2:
            raise TypeError(f"step input {name!r} ({t.dtype}, {t.dim()}-d) cannot be sent to "
                            "the other ranks: only integer inputs of up to 2 dimensions are")
        shape = list(t.shape)
        header += shape + [-1] * (2 - len(shape))
        parts.append(t.reshape(-1).to(torch.int64))
    parts.append(torch.tensor(copies, dtype=torch.int64).reshape(-1))
    return torch.tensor(header, dtype=torch.int64), torch.cat(parts)


def decode_step(inputs: list[tuple[str, torch.dtype]], header: list[int],
                payload: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    feeds = {}
    at = 0
    for i, (name, dtype) in enumerate(inputs):
        shape = [d for d in header[2 + 2 * i:4 + 2 * i] if d >= 0]
        n = 1
        for d in shape:
            n *= d
        feeds[name] = payload[at:at + n].view(shape).to(dtype)
        at += n
    pairs = payload[at:].view(-1, 2).tolist()
    return feeds, [(s, d) for s, d in pairs]


def payload_size(num_inputs: int, header: list[int]) -> int:
    n = 2 * header[1]
    for i in range(num_inputs):
        dims = [d for d in header[2 + 2 * i:4 + 2 * i] if d >= 0]
        size = 1
        for d in dims:
            size *= d
        n += size
    return n


def exchange_reports(group: Any, rank: int, world_size: int, report: dict[str, Any]
                     ) -> list[dict[str, Any]]:
    """Every rank's JSON report, in rank order, on every rank: one broadcast per rank, as
    only broadcast takes a per-call timeout in torch's public API."""
    if "error" in report:  # an over-long error must not break the exchange itself
        report = {**report, "error": report["error"][:REPORT_BYTES // 2]}
    parts = []
    for r in range(world_size):
        buf = json_tensor(report, REPORT_BYTES) if r == rank else \
            torch.zeros(REPORT_BYTES, dtype=torch.uint8)
        broadcast(group, buf, LOAD_TIMEOUT, root=r)
        parts.append(json_from_tensor(buf))
    return parts


def first_error(reports: list[dict[str, Any]]) -> str | None:
    for rank, r in enumerate(reports):
        if not r.get("ok"):
            return f"rank {rank}: {r.get('error', 'failed')}"
    return None
