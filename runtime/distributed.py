"""Several processes serve one multi-rank engine (engine.json "ranks": N > 1): tensor-parallel
shards, or pipeline stages (runtime.pipeline).

Rank 0 is the process that called `Engine.load`: it owns the scheduler, block manager and
tokenizer, builds every step's inputs and broadcasts them; ranks 1..N-1 (`runtime.worker`)
only execute their plan shard (plan.rank<r>.json) on those inputs. The plan's `all_reduce` and
`all_gather` ops reach the other ranks through `Comm`.

Wire protocol, on process groups built directly over one TCPStore (not the global default
group, so an engine leaves torch.distributed to the user and several engines can coexist):
- control (gloo, CPU tensors): the handshake and each step's inputs. Nothing is pickled: JSON
  travels as bytes in a uint8 tensor, step inputs as one int64 tensor after a small header.
  Handshake reports wait long (a rank may be checksumming a big shard), workers wait for
  the next step without limit; everything else has the collective timeout.
- data (gloo on CPU, NCCL on CUDA): the plan's collectives, with the collective timeout
  (over gloo as point-to-point exchanges, see Comm).

Handshake: rank 0 broadcasts HELLO (engine.json digest, device, the whole EngineConfig, plan
input names); every rank loads and verifies its own files and all ranks exchange a JSON report
(KV-cache blocks its budget holds, or its error); every rank takes the smallest block count, so
block ids mean the same on all ranks; a second report round says each rank has allocated.
Then each step: header [STEP, num_copies, the feeds' shapes] and one int64 payload (the feeds in
plan-input order, then the copy-on-write block pairs); SHUTDOWN ends the workers' loop.

Failure: gloo raises within tens of milliseconds when a peer's socket closes (measured ~40 ms
after SIGKILL, on both the reducing and the waiting side), so a dead rank surfaces as an error
in every other rank's next collective. Rank 0 also watches the workers it spawned, so it can
name the rank and how it ended, and notices a death between steps. A stalled (not dead) rank is
caught by the collective timeout (EngineConfig.collective_timeout).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llm_engine.runtime.engine_dir import EngineLoadError, sha256_file

PROTOCOL = 1
# MICRO: a pipeline micro-batch whose step continues with more MICROs and a final STEP.
HELLO, STEP, SHUTDOWN, MICRO = 1, 2, 3, 4
REPORT_BYTES = 8192  # one rank's handshake report (JSON), zero-padded
START_TIMEOUT = 300.0  # seconds for spawned workers to import torch and connect
LOAD_TIMEOUT = datetime.timedelta(minutes=30)  # loading + checksumming a large shard
IDLE_TIMEOUT = datetime.timedelta(days=365)  # workers wait this long between steps
STOP_GRACE = 5.0  # seconds a worker gets to exit after SHUTDOWN before it is killed


class RankFailedError(RuntimeError):
    """A rank of a multi-rank engine died or failed; the engine is stopped for good."""


def engine_ranks(path: str | Path) -> int:
    """engine.json's "ranks" (1 when absent); an unreadable file reads as 1 so that
    load_engine_dir reports the problem."""
    try:
        meta = json.loads((Path(path) / "engine.json").read_text())
        ranks = meta.get("ranks", 1)
    except (OSError, ValueError, AttributeError):
        return 1
    if not isinstance(ranks, int) or ranks < 1:
        raise EngineLoadError(f"{path}/engine.json: 'ranks' must be a positive integer, got "
                              f"{ranks!r}; rebuild the engine")
    parallel = meta.get("parallel") or {}
    tp, pp = parallel.get("tp", ranks), parallel.get("pp", 1)
    if tp * pp != ranks:
        raise EngineLoadError(f"{path}/engine.json: {ranks} ranks with tp={tp}, pp={pp} is "
                              "not a layout this runtime runs; rebuild the engine")
    return ranks


def pipeline_stages(meta: dict[str, Any]) -> int:
    return int((meta.get("parallel") or {}).get("pp", 1))


def tensor_parallel(meta: dict[str, Any]) -> int:
    return int((meta.get("parallel") or {}).get("tp", meta.get("ranks", 1)))


def make_comm(group: Any, rank: int, meta: dict[str, Any], device: str) -> Comm:
    """The communicator of `rank`'s tensor-parallel group: the ranks of its pipeline stage
    (rank = stage * tp + shard), or all ranks without pipelining."""
    tp = tensor_parallel(meta)
    world = int(meta.get("ranks", 1))
    stage = rank // tp
    peers = list(range(stage * tp, stage * tp + tp))
    # NCCL's collectives span the whole group: with stages, exchange among the peers instead.
    p2p = not device.startswith("cuda") or len(peers) != world
    return Comm(group, rank, world, p2p=p2p, peers=peers)


def check_rank_files(path: Path, world_size: int) -> None:
    """Every rank's plan and weights exist: found here, before any process starts."""
    for rank in range(world_size):
        for name in (f"plan.rank{rank}.json", f"weights.rank{rank}.safetensors"):
            if not (path / name).is_file():
                raise EngineLoadError(f"{path / name} is missing; the {world_size}-rank engine "
                                      "is incomplete, rebuild it")


_RANK_FILE = re.compile(r"\.rank(\d+)\.")


def verify_rank_files(path: Path, meta: dict[str, Any], rank: int) -> None:
    """Checksum the files this rank reads: its own plan and weights, and (rank 0) the shared
    ones. Each rank hashes its own shard, so the ranks verify in parallel."""
    for rel, info in meta.get("files", {}).items():
        m = _RANK_FILE.search(rel)
        if (int(m.group(1)) if m else 0) != rank:
            continue
        if sha256_file(path / rel) != info["sha256"]:
            raise EngineLoadError(f"{path / rel} does not match its checksum in engine.json; "
                                  "the file is corrupt or was modified, rebuild the engine")


def engine_digest(path: Path) -> str:
    """Identifies the build: every rank must serve the same engine.json (multi-node ranks
    read their own copy of the directory)."""
    return sha256_file(path / "engine.json")


def default_threads(ranks_here: int) -> int:
    """torch CPU threads per rank: the cores this process may use, shared by the ranks on
    this host (oversubscribed ranks slow every collective down to the slowest)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // ranks_here)


# ---- the data plane -------------------------------------------------------------------------
class Comm:
    """What the plan's collective ops call (`ctx.comm`): sums and gathers over the ranks.

    Over gloo both are one exchange of point-to-point messages with every peer, summed here
    in rank order: gloo's own allreduce took 1.5-2.9 ms for a few KiB on a 2-core host, the
    exchange 0.3-0.5 ms, and a model runs two per layer. Every rank adds the same tensors in
    the same order, so all ranks get bitwise the same sum (and so the same KV and tokens).
    NCCL's collectives are the fast path on GPUs and are used as they are."""

    def __init__(self, group: Any, rank: int, world_size: int, *, p2p: bool = True,
                 peers: list[int] | None = None) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.p2p = p2p
        self.peers = peers if peers is not None else list(range(world_size))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.p2p:
            parts = self._exchange(x)
            out = parts[0] + parts[1]
            for part in parts[2:]:
                out += part
            return out
        # The collective works in place; x may be read again by the plan or be a read-only
        # mmapped weight, so reduce a contiguous copy.
        y = x.clone(memory_format=torch.contiguous_format)
        self.group.allreduce([y]).wait()
        return y

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.p2p:
            return self._exchange(x)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self.group.allgather([parts], [x]).wait()
        return parts

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x, in rank order. All sends and receives are posted before any is
        waited for, so no order of arrival can deadlock."""
        x = x.contiguous()
        parts = [x if r == self.rank else torch.empty_like(x) for r in self.peers]
        pending = []
        for r, part in zip(self.peers, parts):
            if r != self.rank:
                pending.append(self.group.send([x], r, 0))
                pending.append(self.group.recv([part], r, 0))
        for work in pending:
            work.wait()
        return parts


# ---- connecting -----------------------------------------------------------------------------
def control_group(store: Any, rank: int, world_size: int, timeout: float) -> Any:
    return dist.ProcessGroupGloo(dist.PrefixStore("llm-engine/control", store), rank,
                                 world_size, datetime.timedelta(seconds=timeout))


def data_group(store: Any, rank: int, world_size: int, device: str, timeout: float) -> Any:
    if not device.startswith("cuda"):
        return dist.ProcessGroupGloo(dist.PrefixStore("llm-engine/data", store), rank,
                                     world_size, datetime.timedelta(seconds=timeout))
    from torch.distributed import ProcessGroupNCCL

    options = ProcessGroupNCCL.Options()
    options._timeout = datetime.timedelta(seconds=timeout)
    return ProcessGroupNCCL(dist.PrefixStore("llm-engine/data", store), rank, world_size,
                            options)


def torchrun_env() -> dict[str, int] | None:
    """RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE when launched by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "RANK" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return {"rank": int(os.environ["RANK"]), "world_size": world,
            "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", world))}


def env_store(rank: int, world_size: int) -> Any:
    """The store torchrun set up (or our spawner's, via MASTER_ADDR/MASTER_PORT)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun may host the store in its agent (TORCHELASTIC_USE_AGENT_STORE); the env://
        # handler knows every variant.
        store, _, _ = next(dist.rendezvous("env://", rank, world_size,
                                           timeout=datetime.timedelta(seconds=START_TIMEOUT)))
        return store
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                         False, timeout=datetime.timedelta(seconds=START_TIMEOUT))


# ---- messages -------------------------------------------------------------------------------
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


# ---- rank 0 ---------------------------------------------------------------------------------
@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        else:
            how = f"code {code}"
        return f"rank {self.rank} (pid {self.proc.pid}) exited with {how}"


class Cluster:
    """Rank 0's side: the process groups, the workers it spawned (if it did) and a watchdog
    over them. Created by `spawn` (ranks 1..N-1 as local subprocesses) or `join_torchrun`."""

    def __init__(self, path: Path, world_size: int, device: str) -> None:
        self.path = path
        self.world_size = world_size
        self.device = device
        self.local_world_size = world_size
        self.workers: list[_Worker] = []
        self.store: Any = None
        self.control: Any = None
        self.comm: Comm | None = None
        self.input_names: list[str] = []
        self.step_timeout: datetime.timedelta | None = None
        self.error: str | None = None  # set once: the engine is stopped
        self._closed = False
        self._stopping = False
        self._lock = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._wake = threading.Event()

    @classmethod
    def spawn(cls, path: Path, world_size: int, device: str, threads: int) -> Cluster:
        """Start ranks 1..N-1 as `python -m runtime.worker` on this host. They import torch
        while rank 0 loads its own shard."""
        self = cls(path, world_size, device)
        # TCPStore given a host still listens on every interface; anyone who reached it could
        # read and write the ranks' keys. A socket bound to loopback here, handed to the store,
        # keeps a single-host engine's rendezvous on this host.
        # (The store owns the descriptor from then on, so the Python socket lets go of it.)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(max(world_size, 16))
        port, fd = sock.getsockname()[1], sock.detach()
        try:
            self.store = dist.TCPStore("127.0.0.1", port, world_size, True,
                                       wait_for_workers=False, master_listen_fd=fd,
                                       timeout=datetime.timedelta(seconds=START_TIMEOUT))
        except BaseException:
            os.close(fd)
            raise
        env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.store.port),
                   WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                   OMP_NUM_THREADS=str(threads), LLM_ENGINE_RANK0_PID=str(os.getpid()))
        # stdin stays with rank 0 (interactive chat) and stdout is rank 0's output: whatever
        # a worker prints goes to stderr
        out = sys.__stderr__.fileno() if sys.__stderr__ is not None else subprocess.DEVNULL
        try:
            for rank in range(1, world_size):
                proc = subprocess.Popen(  # -P: the caller's working directory stays off
                    [sys.executable, "-P", "-m", "llm_engine.runtime.worker", str(path), "--rank",
                     str(rank)],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdin=subprocess.DEVNULL, stdout=out)
                self.workers.append(_Worker(rank, proc))
        except OSError as e:
            self.abort(f"cannot start rank worker processes: {e}")
            raise EngineLoadError(self.error) from e
        return self

    @classmethod
    def join_torchrun(cls, path: Path, env: dict[str, int], device: str) -> Cluster:
        """Rank 0 of a torchrun launch: the other ranks run runtime.worker already."""
        self = cls(path, env["world_size"], device)
        self.local_world_size = env["local_world_size"]
        self.store = env_store(0, env["world_size"])
        return self

    # ---- handshake ----
    def connect(self, config: dict[str, Any], meta: dict[str, Any], plan: dict[str, Any],
                collective_timeout: float) -> None:
        """Wait for the workers, build the process groups and send HELLO."""
        self._wait_for_workers()
        self.control = control_group(self.store, 0, self.world_size, collective_timeout)
        self.step_timeout = datetime.timedelta(seconds=collective_timeout)
        if self.workers:
            self._watchdog = threading.Thread(target=self._watch, name="rank-watchdog",
                                              daemon=True)
            self._watchdog.start()
        self.input_names = [i["name"] for i in plan["inputs"]]
        hello = json_tensor({"protocol": PROTOCOL, "engine": engine_digest(self.path),
                              "device": self.device, "config": config,
                              "inputs": self.input_names})
        self._guard(lambda: (broadcast(self.control, torch.tensor([HELLO, hello.numel()])),
                             broadcast(self.control, hello)))
        data = data_group(self.store, 0, self.world_size, self.device, collective_timeout)
        self.comm = make_comm(data, 0, meta, self.device)

    def _wait_for_workers(self) -> None:
        """Spawned workers announce themselves in the store just before joining the groups;
        polling lets a worker that dies while starting fail the load at once."""
        if not self.workers:
            return
        keys = [f"llm-engine/started/{w.rank}" for w in self.workers]
        deadline = time.monotonic() + START_TIMEOUT
        while not self.store.check(keys):
            for w in self.workers:
                if w.proc.poll() is not None:
                    raise EngineLoadError(f"{w.describe_exit()} while starting; see its error "
                                          "above")
            if time.monotonic() > deadline:
                raise EngineLoadError(f"the rank workers did not start within {START_TIMEOUT:.0f}"
                                      " s")
            time.sleep(0.05)

    def exchange(self, report: dict[str, Any]) -> list[dict[str, Any]]:
        """A handshake report round; raises EngineLoadError naming the first failed rank."""
        reports = self._guard(lambda: exchange_reports(self.control, 0, self.world_size,
                                                       report))
        error = first_error(reports)
        if error is not None:
            raise EngineLoadError(error)
        return reports

    # ---- steps ----
    def send_step(self, feeds: dict[str, torch.Tensor], copies: list[tuple[int, int]],
                  command: int = STEP) -> None:
        header, payload = encode_step(self.input_names, feeds, copies, command)
        broadcast(self.control, header, self.step_timeout)
        broadcast(self.control, payload, self.step_timeout)

    def check(self) -> None:
        if self.error is not None:
            raise RankFailedError(self.error)

    def fail(self, cause: BaseException | str) -> RankFailedError:
        """Stop the engine after `cause`; returns the error to raise. A failed collective
        usually means a worker died: give the watchdog a moment to say which one."""
        with self._lock:
            if self.error is None:
                self.error = self._diagnose(cause)
        self._stop_workers()
        return RankFailedError(self.error)

    def abort(self, reason: str) -> None:
        """Stop at once (a failed load): kill the workers, no SHUTDOWN."""
        with self._lock:
            if self.error is None:
                self.error = reason
        self._stop_workers(grace=0.0)
        self.close()

    def _diagnose(self, cause: BaseException | str) -> str:
        deadline = time.monotonic() + (2.0 if self.workers else 0.0)
        while True:
            dead = [w for w in self.workers if w.proc.poll() is not None]
            if dead:
                return f"{dead[0].describe_exit()}; the engine is stopped"
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if isinstance(cause, BaseException):
            cause = f"{type(cause).__name__}: {cause}"
        text = " ".join(str(cause).split())
        return f"a step failed on rank 0 ({text}); the engine is stopped"

    def _guard(self, fn):
        """Run a handshake call; a worker dying meanwhile becomes an EngineLoadError."""
        try:
            return fn()
        except RuntimeError as e:
            raise EngineLoadError(str(self.fail(e))) from e

    def _watch(self) -> None:
        while not self._closed:
            for w in self.workers:
                if w.proc.poll() is not None and not self._stopping:
                    with self._lock:
                        if self.error is None:
                            self.error = f"{w.describe_exit()}; the engine is stopped"
                    # The survivors may be waiting on rank 0 and would never notice.
                    self._stop_workers()
                    return
            self._wake.wait(0.1)

    # ---- shutdown ----
    def close(self) -> None:
        """Tell the workers to exit (a healthy engine) and reap them; idempotent."""
        if self._closed:
            return
        if self.error is None and self.control is not None:
            self._stopping = True
            with contextlib.suppress(RuntimeError):
                broadcast(self.control, torch.tensor([SHUTDOWN] + [0] * (
                    1 + 2 * len(self.input_names)), dtype=torch.int64))
        self._stop_workers(grace=STOP_GRACE)
        with self._lock:
            self.error = self.error or "the engine was closed"
        self._closed = True
        self._wake.set()
        # Dropping the groups closes their sockets; a live collective never refers to them.
        self.control = self.comm = self.store = None

    def _stop_workers(self, grace: float = 1.0) -> None:
        self._stopping = True
        deadline = time.monotonic() + grace
        for w in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(max(0.0, deadline - time.monotonic()))
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()
