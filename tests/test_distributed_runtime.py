"""The multi-process runtime on tensor-parallel engines (`--tp 2` builds of the tiny models):
rank 0 (this process) spawns rank 1 as `python -m llm_engine.runtime.worker`, and greedy outputs match
the single-rank engine through Engine.generate, `engine run` and a torchrun launch. A killed
worker stops the engine with an error naming it within seconds; close() leaves no process.

Each Engine.load spawns a worker that imports torch (~4 s on a small CPU box), so engines are
shared where a test does not break them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from llm_engine.runtime import AsyncEngine, Engine, EngineLoadError, SamplingParams
from llm_engine.runtime.async_engine import EngineDeadError
from llm_engine.runtime.cluster import RankFailedError
from llm_engine.runtime.wire import STEP, decode_step, encode_step, exchange_reports, payload_size
from tests.models import build_tiny_engine

ROOT = Path(__file__).resolve().parent.parent
KV = 64 << 10  # bytes of KV cache per rank
TIGHT = 24 << 10  # 32 blocks of 4 tokens on a llama rank: the prompts below get preempted
GREEDY = SamplingParams(temperature=0, max_tokens=12)
ID_PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [7, 7, 120, 33], [250, 11, 2, 87, 45, 19, 100, 64, 3],
              list(range(40, 80)), [1, 2], [*range(40, 70), 9, 9]]
TEXT_PROMPTS = ["Hello, world!", "Paris is the capital of", "The quick brown fox"]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, checkpoints):
    """arch -> its --tp 2 engine dir."""
    root = tmp_path_factory.mktemp("tp2")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            ckpt, _ = checkpoints(arch)
            cache[arch] = build_tiny_engine(ckpt, root / arch, tp=2)
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def llama2(tp2):
    """A shared 2-rank llama engine; tests that break an engine load their own."""
    engine = Engine.load(tp2("llama"), block_size=4, kv_cache_memory=TIGHT)
    yield engine
    engine.close()


def _greedy(engine: Engine, prompts, params: SamplingParams = GREEDY):
    return [(o.token_ids, o.text) for o in engine.generate(prompts, params)]


def _children() -> set[int]:
    """Live (or unreaped) child processes of this process."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            with open(task / "children") as f:
                pids.update(int(p) for p in f.read().split())
        except FileNotFoundError:  # a thread that ended since the listing has no children
            continue
    return pids


def _workers(engine: Engine) -> set[int]:
    return {w.proc.pid for w in engine.cluster.workers}


def _kill(engine: Engine, rank: int = 1) -> int:
    pid = engine.cluster.workers[rank - 1].proc.pid
    os.kill(pid, signal.SIGKILL)
    return pid


# ---- the wire format, without processes --------------------------------------------------
def test_step_message_round_trips():
    feeds = {"input_ids": torch.tensor([[5, 6, 7]]), "position_ids": torch.tensor([[0, 1, 2]]),
             "slot_mapping": torch.tensor([8, 9, 10]),
             "block_tables": torch.tensor([[2, 0], [3, 4]], dtype=torch.int32),
             "context_lens": torch.tensor([1, 2], dtype=torch.int32),
             "query_start_loc": torch.tensor([0, 1, 3], dtype=torch.int32),
             "logits_indices": torch.tensor([0, 2])}
    names = list(feeds)
    header, payload = encode_step(names, feeds, [(3, 7), (4, 8)])
    h = header.tolist()
    assert h[0] == STEP and payload.numel() == payload_size(len(names), h)
    got, copies = decode_step([(n, feeds[n].dtype) for n in names], h, payload)
    assert copies == [(3, 7), (4, 8)]
    for name, want in feeds.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    with pytest.raises(TypeError, match="hidden"):
        encode_step(["hidden"], {"hidden": torch.zeros(2, 3)}, [])


def test_handshake_reports_are_json_per_rank():
    class Loopback:  # one rank: broadcast leaves the buffer as it is
        def broadcast(self, tensors, opts):
            class Done:
                def wait(self):
                    return True

            return Done()

    report = {"ok": False, "error": "x" * 100_000}  # cut, not an overflow
    (got,) = exchange_reports(Loopback(), 0, 1, report)
    assert got["ok"] is False and got["error"] == "x" * len(got["error"])


# ---- generation -----------------------------------------------------------------------------
def test_two_ranks_match_one_rank_llama(engines, llama2):
    one = Engine.load(engines("llama"), block_size=4, kv_cache_memory=KV)
    assert llama2.world_size == 2 and "on rank 0 of 2" in llama2.kv_cache_summary
    want = _greedy(one, ID_PROMPTS + TEXT_PROMPTS)
    got = llama2.generate(ID_PROMPTS + TEXT_PROMPTS, GREEDY)
    assert [(o.token_ids, o.text) for o in got] == want
    # The cache is small enough to preempt: recomputed requests still agree across ranks.
    assert sum(o.metrics["preemptions"] for o in got) > 0
    # rank 0 runs with its share of the host's cores (one each on a 2-core box)
    cpus = len(os.sched_getaffinity(0))
    assert torch.get_num_threads() == max(1, cpus // 2)


def test_two_ranks_match_one_rank_llama_tied(engines, tp2):
    """SmolLM2's head layout, 9 query heads over 3 KV heads: neither splits evenly in two."""
    one = Engine.load(engines("llama_tied"), block_size=4, kv_cache_memory=KV)
    with Engine.load(tp2("llama_tied"), block_size=4, kv_cache_memory=KV) as two:
        assert _greedy(two, ID_PROMPTS) == _greedy(one, ID_PROMPTS)


def test_stream_and_async_on_two_ranks(llama2):
    want = _greedy(llama2, ["Hello, world!"])[0]
    deltas = [o.delta_text for o in llama2.stream("Hello, world!", GREEDY)]
    assert "".join(deltas) == want[1]

    async def main():
        ae = AsyncEngine(llama2)
        try:
            outs = await asyncio.gather(*(ae.complete(p, GREEDY) for p in TEXT_PROMPTS))
        finally:
            ae.shutdown()
        return [(o.token_ids, o.text) for o in outs]

    assert asyncio.run(main()) == _greedy(llama2, TEXT_PROMPTS)


def _cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_engine_run_cli_on_two_ranks(tp2, llama2):
    result = subprocess.run(
        [sys.executable, "-m", "llm_engine.builder.cli", "run", str(tp2("llama")), "-p", TEXT_PROMPTS[0],
         "-p", TEXT_PROMPTS[1], "--max-tokens", "12", "--temperature", "0", "--json",
         "--kv-cache-memory", "64KiB", "--block-size", "4", "--threads", "1"],
        capture_output=True, text=True, env=_cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(o["token_ids"], o["text"]) for o in got] == _greedy(llama2, TEXT_PROMPTS[:2])


def test_torchrun_launch(tp2, llama2, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", "-m", "llm_engine.runtime.worker", str(tp2("llama")), "-p", TEXT_PROMPTS[0], "-p",
         TEXT_PROMPTS[2], "--max-tokens", "12", "--temperature", "0", "--json",
         "--kv-cache-memory", "64KiB", "--block-size", "4"],
        capture_output=True, text=True, env=_cli_env(), timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(o["token_ids"], o["text"]) for o in got] == \
        _greedy(llama2, [TEXT_PROMPTS[0], TEXT_PROMPTS[2]])


def test_worker_outside_torchrun_says_how_to_start_it(tp2, monkeypatch, capsys):
    from llm_engine.runtime.worker import main

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(SystemExit) as info:
        main([str(tp2("llama"))])
    assert info.value.code == 2 and "torchrun" in capsys.readouterr().err


# ---- failures -------------------------------------------------------------------------------
def test_killed_worker_mid_generation_stops_the_engine(tp2):
    engine = Engine.load(tp2("llama"), block_size=4, kv_cache_memory=KV)
    ae = AsyncEngine(engine)
    long = SamplingParams(temperature=0, max_tokens=480, ignore_eos=True)
    engine.add_request([1, 2, 3], long)
    for _ in range(3):
        engine.step()
    killed: dict[str, float] = {}

    def kill() -> None:
        killed["at"] = time.monotonic()
        _kill(engine)

    timer = threading.Timer(0.2, kill)
    timer.start()
    deadline = time.monotonic() + 60
    with pytest.raises(RankFailedError) as info:
        while time.monotonic() < deadline:  # steps take milliseconds: the kill lands mid-step
            engine.step()
    detected = time.monotonic()
    timer.join()
    pid = engine.cluster.workers[0].proc.pid
    assert f"rank 1 (pid {pid}) exited with signal SIGKILL" in str(info.value)
    assert detected - killed["at"] < 15  # measured: ~30 ms
    assert not engine.healthy and engine.error == str(info.value)
    with pytest.raises(RankFailedError, match="rank 1"):
        engine.add_request([1, 2], GREEDY)
    with pytest.raises(RankFailedError, match="rank 1"):
        engine.step()
    # the process stays up; the asyncio front reports the failure too
    assert not ae.alive
    with pytest.raises(EngineDeadError, match="rank 1"):
        asyncio.run(ae.complete([1, 2], GREEDY))
    ae.shutdown()
    engine.close()
    assert not _workers(engine) & _children()


def test_killed_idle_worker_is_noticed_between_steps(tp2):
    engine = Engine.load(tp2("llama"), block_size=4, kv_cache_memory=KV)
    ae = AsyncEngine(engine)
    assert asyncio.run(ae.complete([1, 2, 3], GREEDY)).finish_reason == "length"
    start = time.monotonic()
    pid = _kill(engine)
    while ae.alive and time.monotonic() - start < 15:
        time.sleep(0.01)
    assert not ae.alive and time.monotonic() - start < 5  # the watchdog polls every 0.1 s
    assert engine.error == f"rank 1 (pid {pid}) exited with signal SIGKILL; the engine is stopped"
    with pytest.raises(EngineDeadError, match="SIGKILL"):
        asyncio.run(ae.complete([1, 2, 3], GREEDY))
    ae.shutdown()
    engine.close()
    assert not _workers(engine) & _children()


def test_close_stops_the_workers(tp2):
    engine = Engine.load(tp2("llama"), block_size=4, kv_cache_memory=KV)
    procs = [w.proc for w in engine.cluster.workers]
    assert _workers(engine) <= _children()
    engine.generate([[1, 2, 3]], GREEDY)
    start = time.monotonic()
    engine.close()
    assert time.monotonic() - start < 5
    assert [p.returncode for p in procs] == [0]  # a clean SHUTDOWN, not a kill
    assert not _workers(engine) & _children()
    engine.close()  # idempotent
    assert not engine.healthy and engine.error == "the engine was closed"
    with pytest.raises(RankFailedError, match="closed"):
        engine.generate([[1, 2, 3]], GREEDY)


def test_dropped_engine_stops_its_workers(tp2):
    engine = Engine.load(tp2("llama"), block_size=4, kv_cache_memory=KV)
    proc = engine.cluster.workers[0].proc
    del engine
    assert proc.poll() == 0 and proc.pid not in _children()


@pytest.mark.parametrize("listed", [True, False])
def test_missing_rank_file_fails_before_any_process_starts(tp2, tmp_path, listed):
    broken = tmp_path / "engine"
    shutil.copytree(tp2("llama"), broken)
    (broken / "plan.rank1.json").unlink()
    if not listed:  # not even named in engine.json: found by the rank-file check
        meta = json.loads((broken / "engine.json").read_text())
        del meta["files"]["plan.rank1.json"]
        (broken / "engine.json").write_text(json.dumps(meta))
    before, start = _children(), time.monotonic()
    with pytest.raises(EngineLoadError, match=r"plan\.rank1\.json is missing"):
        Engine.load(broken, kv_cache_memory=KV)
    assert time.monotonic() - start < 2 and _children() <= before


def test_corrupt_shard_is_reported_by_its_rank(tp2, tmp_path):
    broken = tmp_path / "engine"
    shutil.copytree(tp2("llama"), broken)
    weights = broken / "weights.rank1.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only rank 1's checksum finds it
    weights.write_bytes(bytes(data))
    before = _children()
    with pytest.raises(EngineLoadError, match=r"rank 1: .*weights\.rank1\.safetensors does not "
                                              "match its checksum"):
        Engine.load(broken, kv_cache_memory=KV)
    assert _children() <= before


def test_unknown_parallel_layout_is_refused_clearly(tp2, tmp_path):
    engine_dir = tmp_path / "engine"
    shutil.copytree(tp2("llama"), engine_dir)
    meta = json.loads((engine_dir / "engine.json").read_text())
    meta["parallel"] = {"tp": 2, "pp": 2}
    (engine_dir / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(EngineLoadError, match="not a layout this runtime runs"):
        Engine.load(engine_dir, kv_cache_memory=KV)


# ---- pipeline parallelism ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pp2(tmp_path_factory, checkpoints):
    ckpt, _ = checkpoints("llama")
    return build_tiny_engine(ckpt, tmp_path_factory.mktemp("pp2") / "llama", pp=2)


@pytest.mark.parametrize("microbatches", [None, 1, 3])
def test_pipeline_stages_match_one_rank(engines, pp2, microbatches):
    one = Engine.load(engines("llama"), block_size=4, kv_cache_memory=KV)
    want = _greedy(one, ID_PROMPTS)
    with Engine.load(pp2, block_size=4, kv_cache_memory=TIGHT,
                     pp_microbatches=microbatches) as two:
        got = two.generate(ID_PROMPTS, GREEDY)
        stats = two.pipeline_stats
    assert [(o.token_ids, o.text) for o in got] == want
    assert sum(o.metrics["preemptions"] for o in got) > 0  # recompute agrees across stages
    assert stats["steps"] > 0 and len(stats["busy_s"]) == 2 and all(stats["busy_s"])
    assert 0 <= stats["bubble_fraction"] < 1


def test_engine_run_cli_on_pipeline(pp2, engines):
    result = subprocess.run(
        [sys.executable, "-m", "llm_engine.builder.cli", "run", str(pp2), "-p", TEXT_PROMPTS[0],
         "-p", TEXT_PROMPTS[1], "--max-tokens", "12", "--temperature", "0", "--json",
         "--kv-cache-memory", "64KiB", "--block-size", "4", "--threads", "1"],
        capture_output=True, text=True, env=_cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    one = Engine.load(engines("llama"), block_size=4, kv_cache_memory=KV)
    assert [(o["token_ids"], o["text"]) for o in got] == _greedy(one, TEXT_PROMPTS[:2])


def test_killed_stage_stops_the_pipeline(pp2):
    engine = Engine.load(pp2, block_size=4, kv_cache_memory=KV)
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=480,
                                                 ignore_eos=True))
    engine.step()
    pid = _kill(engine)
    start = time.monotonic()
    with pytest.raises(RankFailedError, match=f"rank 1 \\(pid {pid}\\) exited with signal"):
        while time.monotonic() - start < 60:
            engine.step()
    assert time.monotonic() - start < 15
    assert not engine.healthy
    engine.close()
    assert not _workers(engine) & _children()


def test_tensor_parallel_stages_match_one_rank(engines, built):
    """tp=2 inside each of 2 stages: 4 ranks, collectives among a stage's shards, each shard
    passing the residual stream to its counterpart in the next stage."""
    path = built("llama", tp=2, pp=2)
    meta = json.loads((path / "engine.json").read_text())
    assert meta["ranks"] == 4 and meta["parallel"] == {"tp": 2, "pp": 2}
    one = Engine.load(engines("llama"), block_size=4, kv_cache_memory=KV)
    with Engine.load(path, block_size=4, kv_cache_memory=KV) as four:
        assert four.world_size == 4
        assert _greedy(four, ID_PROMPTS[:4]) == _greedy(one, ID_PROMPTS[:4])
        assert len(four.pipeline_stats["busy_s"]) == 4
