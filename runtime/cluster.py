"""The processes of a multi-rank engine (engine.json "ranks": N > 1; tensor-parallel shards, or
pipeline stages, runtime.pipeline): how they are started, find each other and are stopped.

Rank 0 is the process that called `Engine.load`: it owns the scheduler, block manager and
tokenizer, builds every step's inputs and broadcasts them (runtime.wire); ranks 1..N-1
(`runtime.worker`) only execute their plan shard (plan.rank<r>.json) on those inputs. The plan's
`all_reduce` and `all_gather` ops reach the other ranks through `Comm` (runtime.comm).

Connecting: rank 0 either spawns ranks 1..N-1 on this host, with a TCPStore listening on
loopback only (`Cluster.spawn`), or joins a torchrun launch's store (`Cluster.join_torchrun`);
the workers reach the same store (`env_store`). On it go process groups built directly (not the
global default group, so an engine leaves torch.distributed to the user and several engines can
coexist): control (gloo, CPU tensors) for runtime.wire's messages, and data (gloo on CPU, NCCL
on CUDA) for the plan's collectives, with the collective timeout.

Failure: gloo raises within tens of milliseconds when a peer's socket closes (measured ~40 ms
after SIGKILL, on both the reducing and the waiting side), so a dead rank surfaces as an error
in every other rank's next collective. Rank 0 also watches the workers it spawned, so it can
name the rank and how it ended, and notices a death between steps. A stalled (not dead) rank is
caught by the collective timeout (EngineConfig.collective_timeout).
"""

from __future__ import annotations

import contextlib
import datetime
import os
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

from llm_engine.runtime.comm import Comm, make_comm
from llm_engine.runtime.cpu_info import cpu_info
from llm_engine.runtime.engine_dir import EngineLoadError
from llm_engine.runtime.rank_files import engine_digest
from llm_engine.runtime.wire import (
    HELLO,
    PROTOCOL,
    SHUTDOWN,
    STEP,
    broadcast,
    encode_step,
    exchange_reports,
    first_error,
    json_tensor,
)

START_TIMEOUT = 300.0  # seconds for spawned workers to import torch and connect
STOP_GRACE = 5.0  # seconds a worker gets to exit after SHUTDOWN before it is killed


class RankFailedError(RuntimeError):
    """A rank of a multi-rank engine died or failed; the engine is stopped for good."""


def default_threads(ranks_here: int) -> int:
    """CPU threads per rank: the physical cores this process may use (a core's second
    hyperthread adds contention, not bandwidth), shared by the ranks on this host
    (oversubscribed ranks slow every collective down to the slowest)."""
    return max(1, cpu_info().physical_cores // ranks_here)


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
