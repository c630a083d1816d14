"""A rank of a multi-rank engine other than 0: run this rank's plan on the steps rank 0 sends.

Engine.load on rank 0 starts these itself (`python -m runtime.worker ENGINE_DIR --rank R`, with
MASTER_ADDR/MASTER_PORT/WORLD_SIZE set); nobody needs to run that by hand. For several hosts,
torchrun starts every rank:

    torchrun --nproc-per-node 2 -m runtime.worker ENGINE_DIR --prompt "Hello" --max-tokens 32

There rank 0 runs `engine run` with the options given (its Engine joins this launch instead of
spawning), prints the outputs and, on exit, sends SHUTDOWN; the other ranks serve until then.
All engine options reach the other ranks in the handshake, so they only need ENGINE_DIR.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from llm_engine.kernels.dtypes import to_torch_dtype
from llm_engine.runtime.backend import choose_backend, make_runner
from llm_engine.runtime.cluster import (
    START_TIMEOUT,
    control_group,
    data_group,
    default_threads,
    env_store,
    torchrun_env,
)
from llm_engine.runtime.comm import make_comm
from llm_engine.runtime.engine import EngineConfig
from llm_engine.runtime.engine_dir import EngineLoadError, load_engine_dir
from llm_engine.runtime.executor import Executor, KVCache, KVCacheSpec
from llm_engine.runtime.kv_budget import kv_cache_blocks
from llm_engine.runtime.pipeline import RECV_PREFIX, Stage, StageIO
from llm_engine.runtime.rank_files import (
    engine_digest,
    engine_ranks,
    pipeline_stages,
    tensor_parallel,
    verify_rank_files,
)
from llm_engine.runtime.wire import (
    HELLO,
    IDLE_TIMEOUT,
    MICRO,
    PROTOCOL,
    SHUTDOWN,
    STEP,
    broadcast,
    decode_step,
    exchange_reports,
    first_error,
    json_from_tensor,
    payload_size,
)


def _say(rank: int, message: str) -> None:
    print(f"llm-engine rank {rank}: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _exit_with_parent(parent: int) -> None:
    """A spawned worker must not outlive rank 0, even while it is still importing torch or
    connecting. Polling the parent pid rather than PR_SET_PDEATHSIG: that signal fires when the
    *thread* that spawned us exits, which is any thread calling Engine.load, not only the
    process ending. `parent` comes from rank 0: by the time this runs it may be gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _load(path: Path, rank: int, hello: dict[str, Any], device: str, local_world_size: int
          ) -> tuple[Any, EngineConfig, int]:
    """This rank's files, checked against rank 0's engine; returns (files, config, blocks)."""
    if hello.get("protocol") != PROTOCOL:
        raise EngineLoadError(f"rank 0 speaks protocol {hello.get('protocol')}, this worker "
                              f"{PROTOCOL}; run the same llm-engine on every host")
    if engine_digest(path) != hello["engine"]:
        raise EngineLoadError(f"{path}/engine.json differs from rank 0's; every rank must "
                              "serve the same engine build")
    fields = EngineConfig.__dataclass_fields__
    config = EngineConfig(**{k: v for k, v in hello["config"].items() if k in fields})
    files = load_engine_dir(path, device=device, rank=rank, verify_checksums=False)
    if config.verify_checksums:
        verify_rank_files(path, files.meta, rank)
    # A pipeline stage also takes the previous stage's values (`pp.*`), from that stage.
    names = [i["name"] for i in files.plan["inputs"] if not i["name"].startswith(RECV_PREFIX)]
    if names != hello["inputs"]:
        raise EngineLoadError(f"plan.rank{rank}.json takes inputs {names}, rank 0's plan "
                              f"{hello['inputs']}; rebuild the engine")
    blocks = kv_cache_blocks(files.plan["kv_cache"]["layers"], config, local_world_size)
    return files, config, blocks


def serve(path: Path, rank: int, world_size: int, local_rank: int, local_world_size: int
          ) -> int:
    """Join the engine's ranks and run steps until SHUTDOWN; returns the exit code."""
    store = env_store(rank, world_size)
    store.set(f"llm-engine/started/{rank}", str(os.getpid()))  # rank 0 polls for it
    control = control_group(store, rank, world_size, START_TIMEOUT)
    hello = _receive_hello(control)
    device = hello["device"]
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    timeout = hello["config"].get("collective_timeout", 60.0)
    data = data_group(store, rank, world_size, device, timeout)

    # Handshake round 1: files loaded and verified, blocks this rank's budget holds.
    report: dict[str, Any] = {"ok": True}
    try:
        files, config, report["num_blocks"] = _load(path, rank, hello, device,
                                                    local_world_size)
        torch.set_num_threads(config.threads or default_threads(local_world_size))
    except Exception as e:  # rank 0 reports it, naming this rank
        report = {"ok": False, "error": str(e)}
    reports = exchange_reports(control, rank, world_size, report)
    if first_error(reports) is not None:
        return 1
    # Round 2: the cache (with the block count every rank agreed on) and the plan are ready.
    try:
        layers = files.plan["kv_cache"]["layers"]
        spec = KVCacheSpec(min(r["num_blocks"] for r in reports), config.block_size, layers)
        comm = make_comm(data, rank, files.meta, device)
        cache = KVCache(spec, device, comm)
        runner = make_runner(files, config, choose_backend(config.kernels, device), device)
        executor = Executor(runner, cache, device)
        stages = pipeline_stages(files.meta)
        stage = Stage(rank, stages, data, runner, cache, StageIO.of(files.plan),
                      tensor_parallel(files.meta)) if stages > 1 else None
        report = {"ok": True}
    except Exception as e:
        report = {"ok": False, "error": str(e)}
    if first_error(exchange_reports(control, rank, world_size, report)) is not None:
        return 1
    _run_steps(control, executor, files.plan, datetime.timedelta(seconds=timeout), stage)
    return 0


def _receive_hello(control: Any) -> dict[str, Any]:
    size = torch.empty(2, dtype=torch.int64)
    broadcast(control, size)
    kind, nbytes = size.tolist()
    if kind != HELLO:
        raise RuntimeError(f"expected HELLO from rank 0, got message {kind}")
    raw = torch.empty(nbytes, dtype=torch.uint8)
    broadcast(control, raw)
    return json_from_tensor(raw)


def _run_steps(control: Any, executor: Executor, plan: dict[str, Any],
               timeout: datetime.timedelta, stage: Stage | None = None) -> None:
    """Run each step rank 0 broadcasts until SHUTDOWN. A pipeline stage collects the
    step's micro-batches (MICRO..., STEP) and runs them between its neighbours."""
    inputs = [(i["name"], to_torch_dtype(i["dtype"])) for i in plan["inputs"]
              if not i["name"].startswith(RECV_PREFIX)]
    header = torch.empty(2 + 2 * len(inputs), dtype=torch.int64)
    micro: list[tuple[dict[str, torch.Tensor], list[tuple[int, int]]]] = []
    while True:
        # idle until rank 0 has work; within a step, the collective timeout
        broadcast(control, header, timeout if micro else IDLE_TIMEOUT)
        h = header.tolist()
        if h[0] == SHUTDOWN:
            return
        if h[0] not in (STEP, MICRO) or (h[0] == MICRO and stage is None):
            raise RuntimeError(f"unknown command {h[0]} from rank 0")
        payload = torch.empty(payload_size(len(inputs), h), dtype=torch.int64)
        broadcast(control, payload, timeout)
        micro.append(decode_step(inputs, h, payload))
        if h[0] == MICRO:
            continue
        if stage is not None:
            stage.serve_step(micro)
        else:
            executor.execute(*micro[0])
        micro = []


def _engine_dir_arg(argv: list[str]) -> Path | None:
    """ENGINE_DIR from an `engine run` command line (parsed as rank 0 parses it)."""
    from llm_engine.runtime.cli import run

    ctx = run.make_context("llm_engine.runtime.worker", list(argv), resilient_parsing=True)
    return ctx.params.get("engine_dir")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = torchrun_env()
    if "--rank" in argv:  # spawned by Engine.load on rank 0
        i = argv.index("--rank")
        rank = int(argv[i + 1])
        path = Path(argv[0])
        world_size = int(os.environ["WORLD_SIZE"])
        local = (rank, world_size)
        _exit_with_parent(int(os.environ["LLM_ENGINE_RANK0_PID"]))
        # Ctrl-C in a terminal reaches the whole process group: rank 0 decides what happens.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    elif env is not None:
        path = _engine_dir_arg(argv)
        rank, world_size = env["rank"], env["world_size"]
        local = (env["local_rank"], env["local_world_size"])
        if path is None:
            _say(rank, "usage: torchrun ... -m runtime.worker ENGINE_DIR [engine run options]")
            sys.exit(2)
        try:
            ranks = engine_ranks(path)
        except EngineLoadError as e:
            _say(rank, f"error: {e}")
            sys.exit(2)
        if ranks != world_size:
            _say(rank, f"error: {path} has {ranks} rank(s) but torchrun started {world_size} "
                       f"processes; use --nproc-per-node/--nnodes for {ranks} in all")
            sys.exit(2)
        if rank == 0:
            from llm_engine.runtime.cli import run

            run.main(args=argv, prog_name="python -m runtime.worker")  # exits
            return
    else:
        print("error: runtime.worker runs the ranks > 0 of a multi-rank engine; Engine.load "
              "and `engine run` start them, or launch all ranks with `torchrun "
              "--nproc-per-node N -m runtime.worker ENGINE_DIR ...`", file=sys.stderr)
        sys.exit(2)
    try:
        code = serve(Path(path), rank, world_size, *local)
    except RuntimeError as e:  # a peer died or the connection broke: rank 0 reports it
        _say(rank, f"stopping: {e}")
        code = 1
    except Exception:  # a bug: show where
        traceback.print_exc()
        code = 1
    # Interpreter teardown with torch and live process groups takes about a second (measured:
    # exit 0.9-1.1 s after rank 0 died, against 0.07 s this way); nothing needs cleaning up.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
