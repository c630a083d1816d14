"""The engine: load an engine directory, then serve requests with in-flight batching.

`Engine` is synchronous and single-threaded: `add_request` queues, `step` runs one batch and
returns what changed, `generate`/`stream` loop over `step`. `AsyncEngine` (runtime.async_engine)
runs the same loop on a thread for asyncio callers.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_engine.runtime.block_manager import BlockManager
from llm_engine.runtime.distributed import (
    Cluster,
    check_rank_files,
    default_threads,
    engine_ranks,
    pipeline_stages,
    tensor_parallel,
    torchrun_env,
    verify_rank_files,
)
from llm_engine.runtime.engine_dir import EngineFiles, EngineLoadError, load_engine_dir
from llm_engine.runtime.executor import Executor, KVCache, KVCacheSpec
from llm_engine.runtime.kernels import bind_kernels, choose_backend, verify_kernels
from llm_engine.runtime.plan import PlanRunner
from llm_engine.runtime.request import MAX_CACHE_SALT_CHARS, Request
from llm_engine.runtime.sampling import SamplerState, SamplingParams, prompt_logprobs_for, sample
from llm_engine.runtime.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

DEFAULT_KV_CACHE_BYTES = 2 << 30


# What malformed plan values raise from inside the runtime (ValueError is the caller's: bad
# options keep their type).
_MALFORMED = (KeyError, TypeError, IndexError, ZeroDivisionError, OverflowError,
              AttributeError, RecursionError)


@dataclass
class Output:
    """A request's state as handed to callers: the whole output so far plus, for streaming,
    what is new since the last Output of the same request (`delta_*`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # None while running; stop | length | abort | error
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float | None] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; default: min(2 GiB, kv_cache_fraction * free)
    kv_cache_fraction: float = 0.5  # of available memory, when kv_cache_memory is not set
    max_num_seqs: int = 64
    max_batch_tokens: int | None = None  # default: what the engine's memory plan was built for
    prefix_caching: bool = True
    verify_checksums: bool = True
    kernels: str = "auto"  # auto (triton on CUDA, else reference) | reference | triton
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (CUDA + triton kernels)
    threads: int | None = None  # torch CPU threads per rank; default: torch's on one rank,
    #                             the host's cores divided among its ranks on several
    pp_microbatches: int | None = None  # pipeline engines: micro-batches per step (default:
    #                                     one per stage)
    collective_timeout: float = 60.0  # seconds a rank waits inside a step for a stalled peer


def available_memory() -> int:
    """Bytes the OS would hand out now (MemAvailable), the CPU analogue of free GPU memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_cache_blocks(layers: list[dict[str, Any]], config: EngineConfig,
                    ranks_here: int = 1) -> int:
    """Blocks this rank's KV-cache budget holds. The default budget is shared by the ranks on
    one host; an explicit kv_cache_memory is per rank (like memory per GPU)."""
    per_block = KVCacheSpec.bytes_per_block(layers, config.block_size)
    budget = config.kv_cache_memory
    if budget is None:
        budget = min(DEFAULT_KV_CACHE_BYTES,
                     int(config.kv_cache_fraction * available_memory()) // ranks_here)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise EngineLoadError(f"KV cache budget of {budget} bytes holds no block "
                              f"({per_block} bytes each); raise --kv-cache-memory")
    return num_blocks


def make_runner(files: EngineFiles, config: EngineConfig, backend: str, device: str
                ) -> PlanRunner:
    """The plan bound to this rank's weights and (triton backend) verified kernels, or
    (onnx backend) the engine's ONNX graph in an onnxruntime session."""
    # the plan's ops and weights first: an op this runtime lacks is "upgrade", not "tampered"
    runner = PlanRunner(files.plan, files.weights)
    sources = verify_kernels(files.path, files.plan)
    if backend == "onnx":
        from llm_engine.runtime.onnx_backend import OnnxRunner

        # onnxruntime's pool gets the cores; torch (sampling, KV stores, metadata) runs on the
        # calling thread, because two thread pools spinning on the same cores cost more than
        # torch's small per-step work gains from threads (measured: 46 -> 102 tok/s on 2 cores).
        runner = OnnxRunner(files.path, files.plan, config.threads or default_threads(1))
        torch.set_num_threads(1)
        return runner
    if backend != "triton" and device == "cpu":
        return runner
    bound = bind_kernels(files.plan, sources, config.block_size) if backend == "triton" else {}
    weights = files.weights
    if device != "cpu":  # the mmapped file stays on the host; the GPU gets one copy
        weights = {k: v.to(device) for k, v in weights.items()}
    return PlanRunner(files.plan, weights, bound)


class Engine:
    def __init__(self, files: EngineFiles, config: EngineConfig, device: str = "cpu",
                 cluster: Cluster | None = None) -> None:
        """`cluster`: this process is rank 0 of a multi-rank engine (see Engine.load)."""
        self.files = files
        self.meta = files.meta
        self.config = config
        self.device = device
        self.cluster = cluster
        gen = self.meta.get("generation", {})
        self.eos_token_ids: list[int] = list(gen.get("eos_token_ids") or [])
        self.vocab_size: int = gen.get("vocab_size") or 0
        self.max_seq_len: int = gen.get("max_seq_len") or self.meta["build"]["max_seq_len"]
        self.tokenizer = self._load_tokenizer()

        layers = files.plan["kv_cache"]["layers"]
        if cluster is None:
            num_blocks = kv_cache_blocks(layers, config)
        else:
            # Block ids must mean the same on every rank, and KV bytes per block differ
            # between ranks: all take the smallest count any rank's budget holds.
            num_blocks = kv_cache_blocks(layers, config, cluster.local_world_size)
            reports = cluster.exchange({"ok": True, "num_blocks": num_blocks})
            num_blocks = min(r["num_blocks"] for r in reports)
        self.kv_spec = KVCacheSpec(num_blocks, config.block_size, layers)
        self.cache = KVCache(self.kv_spec, device, cluster.comm if cluster else None)
        self.blocks = BlockManager(num_blocks, config.block_size,
                                   prefix_caching=config.prefix_caching)
        built_for = self.meta["build"].get("max_batch_tokens", 2048)
        max_batch_tokens = config.max_batch_tokens or built_for
        self.scheduler = Scheduler(
            SchedulerConfig(max_batch_tokens=max_batch_tokens, max_num_seqs=config.max_num_seqs,
                            max_seq_len=self.max_seq_len), self.blocks)
        self.kernel_backend = choose_backend(config.kernels, device,
                                             files if cluster is None else None)
        runner = make_runner(files, config, self.kernel_backend, device)
        graphs = None
        # Graphs are single-rank: every rank would have to replay them in lockstep.
        if (config.cuda_graphs and device.startswith("cuda") and self.kernel_backend == "triton"
                and cluster is None):
            from llm_engine.runtime.cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(runner, self.cache, max_batch=config.max_num_seqs,
                                  max_blocks=-(-self.max_seq_len // config.block_size),
                                  device=device)
        pipeline = None
        stages = pipeline_stages(self.meta)
        if cluster is not None and stages > 1:
            from llm_engine.runtime.pipeline import PipelineStats, Stage, StageIO, logits_spec

            assert cluster.comm is not None
            stage = Stage(0, stages, cluster.comm.group, runner, self.cache,
                          StageIO.of(files.plan), tensor_parallel(self.meta))
            last = (stages - 1) * tensor_parallel(self.meta)  # shard 0 of the last stage
            pipeline = (stage, *logits_spec(files.path, last), PipelineStats())
        self.executor = Executor(runner, self.cache, device, graphs, cluster, pipeline,
                                 config.pp_microbatches or stages)
        if cluster is not None:
            cluster.exchange({"ok": True})  # every rank has allocated: ready
            # Workers get SHUTDOWN when the engine is closed, collected or the process exits.
            self._finalizer = weakref.finalize(self, cluster.close)
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prompt_tokens": 0, "generated_tokens": 0}

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", **options: Any) -> Engine:
        """Open an engine directory. Options are EngineConfig fields (block_size,
        kv_cache_memory, max_num_seqs, max_batch_tokens, prefix_caching, ...)."""
        unknown = set(options) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown engine option(s) {sorted(unknown)}; valid: "
                            f"{sorted(EngineConfig.__dataclass_fields__)}")
        config = EngineConfig(**options)
        if config.threads is not None and config.threads < 1:
            raise ValueError(f"threads must be >= 1, got {config.threads}")
        world_size = engine_ranks(path)
        if world_size > 1:
            return cls._load_ranks(Path(path), device, config, world_size)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        files = load_engine_dir(path, device=device, verify_checksums=config.verify_checksums)
        try:
            return cls(files, config, device)
        except _MALFORMED as e:
            # The directory's values are untrusted: one the loader's own checks did not
            # anticipate still ends as a load error, not a crash deep in the runtime.
            raise EngineLoadError(f"{path}: the engine's files hold a value the runtime "
                                  f"cannot use ({type(e).__name__}: {str(e)[:200]}); rebuild "
                                  "the engine") from e

    @classmethod
    def _load_ranks(cls, path: Path, device: str, config: EngineConfig, world_size: int
                    ) -> Engine:
        """Rank 0 of a multi-rank engine: spawn ranks 1..N-1 on this host, or, under a
        torchrun launch of the same size, join the ranks it started (runtime.worker)."""
        # Everything that can be checked here is, before any process starts.
        files = load_engine_dir(path, device=device, verify_checksums=False)
        check_rank_files(path, world_size)
        env = torchrun_env()
        if env is not None and env["world_size"] == world_size:
            if env["rank"] != 0:
                raise EngineLoadError("under torchrun, Engine.load runs on rank 0 only; the "
                                      "other ranks run `python -m runtime.worker ENGINE_DIR`")
            threads = config.threads or default_threads(env["local_world_size"])
            cluster = Cluster.join_torchrun(path, env, device)
        else:
            threads = config.threads or default_threads(world_size)
            cluster = Cluster.spawn(path, world_size, device, threads)
        torch.set_num_threads(threads)
        try:
            if config.verify_checksums:  # the workers verify theirs meanwhile
                verify_rank_files(path, files.meta, 0)
            cluster.connect(dataclasses.asdict(config), files.meta, files.plan,
                            config.collective_timeout)
            return cls(files, config, device, cluster)
        except BaseException as e:
            cluster.abort(f"loading failed: {e}")  # no worker may outlive a failed load
            raise

    # ---- lifetime -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.cluster.world_size if self.cluster is not None else 1

    @property
    def error(self) -> str | None:
        """Why the engine stopped (a rank died or failed, or it was closed); None while
        it can serve."""
        return self.cluster.error if self.cluster is not None else None

    @property
    def pipeline_stats(self) -> dict[str, Any] | None:
        """Pipeline engines: steps, wall and per-stage compute seconds, and the bubble
        fraction (the share of stage-time spent waiting); None otherwise."""
        pipeline = self.executor.pipeline
        return pipeline[3].to_json() if pipeline is not None else None

    @property
    def healthy(self) -> bool:
        return self.error is None

    def close(self) -> None:
        """Stop the other ranks (a no-op on a single rank); call it from the thread that
        steps. Also runs when the engine is garbage-collected or the process exits."""
        if self.cluster is not None:
            self._finalizer()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_healthy(self) -> None:
        if self.cluster is not None:
            self.cluster.check()

    def _load_tokenizer(self):
        rel = self.meta.get("tokenizer")
        if not rel:
            return None
        from llm_engine.runtime.engine_dir import engine_path
        from llm_engine.runtime.tokenizer import Tokenizer

        # its files are manifest entries, checked when the directory was loaded
        return Tokenizer.load(engine_path(self.files.path, rel, "engine.json: tokenizer"))

    @property
    def kv_cache_summary(self) -> str:
        spec = self.kv_spec
        mib = spec.num_blocks * KVCacheSpec.bytes_per_block(spec.layers, spec.block_size) / 2**20
        where = f" on rank 0 of {self.world_size}" if self.cluster is not None else ""
        return (f"{spec.num_blocks} blocks = {spec.num_blocks * spec.block_size} tokens "
                f"({mib:.0f} MiB{where}, block size {spec.block_size})")

    # ---- prompts ------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer; pass token ids")
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def encode(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer; pass a list of token ids")
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer.encode(prompt)
            if self.vocab_size and max(ids, default=0) >= self.vocab_size:
                raise ValueError(f"the tokenizer produced id {max(ids)} but the model's vocab "
                                 f"is {self.vocab_size}; the engine's tokenizer does not match "
                                 "its model, rebuild it")
            return prompt, ids
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size}); "
                             f"got {bad[:5]}")
        return None, ids

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    *, request_id: str | None = None, priority: int = 0,
                    cache_salt: str | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError for a bad prompt or params,
        RankFailedError once a multi-rank engine has stopped. `cache_salt`: the request reuses
        (and offers) prefix-cache blocks only among requests with the same salt (vLLM's
        `cache_salt`), so their hits reveal nothing to others."""
        self._check_healthy()
        if cache_salt is not None and (not isinstance(cache_salt, str)
                                       or len(cache_salt) > MAX_CACHE_SALT_CHARS):
            raise ValueError(f"cache_salt must be a string of at most {MAX_CACHE_SALT_CHARS} "
                             "characters")
        params = params or SamplingParams()
        text, ids = self.encode(prompt)
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"prompt is {len(ids)} tokens but the engine's max_seq_len is "
                             f"{self.max_seq_len}; shorten it or rebuild with a larger "
                             "--max-seq-len")
        limit = self.max_seq_len
        if params.max_tokens is not None:
            limit = min(limit, len(ids) + params.max_tokens)
        req = Request(request_id or f"req-{next(self._ids)}", ids, params, limit,
                      priority=priority, prompt_text=text,
                      cache_salt=(cache_salt or "").encode("utf-8", "surrogatepass"))
        req.sampler = SamplerState(params, ids, self.eos_token_ids)
        if self.tokenizer is not None:
            from llm_engine.runtime.tokenizer import IncrementalDetokenizer

            req.detok = IncrementalDetokenizer(self.tokenizer, ids,
                                               skip_special_tokens=params.skip_special_tokens)
        if params.logprobs is not None:
            req.logprobs = []
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]  # the first token has no prediction
        self.scheduler.add(req)
        self.stats["prompt_tokens"] += len(ids)
        return req.id

    def abort(self, request_id: str) -> Output | None:
        req = self.scheduler.abort(request_id)
        return self._output(req) if req is not None else None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[Output]:
        """Run one batch. Returns an Output for every request that produced tokens or
        finished during the step. On a multi-rank engine, raises RankFailedError naming the
        rank when one dies; the engine is stopped from then on (`healthy`, `error`)."""
        self._check_healthy()
        sched = self.scheduler.schedule()
        changed: dict[str, Request] = {r.id: r for r in sched.finished}
        for req in sched.finished:  # ended by the scheduler (cache full): emit held-back text
            if req.finish_reason == "length":
                self._flush(req)
        if sched.chunks:
            self._run(sched, changed)
        self.stats["steps"] += 1
        return [self._output(r) for r in changed.values()]

    def _run(self, sched: SchedulerOutput, changed: dict[str, Request]) -> None:
        tables = [self.blocks.block_table(c.req.id) for c in sched.chunks]
        scheduled = time.monotonic()
        for c in sched.chunks:
            if c.req.first_scheduled_time is None:
                c.req.first_scheduled_time = scheduled
        try:
            result = self.executor.run(sched.chunks, tables, sched.copies)
        except BaseException as e:
            if self.cluster is None:
                raise
            failure = self.cluster.fail(e)  # the ranks are out of step now: stop them all
            if isinstance(e, Exception):
                raise failure from e
            raise  # KeyboardInterrupt and the like stay what they are
        self.scheduler.update(sched)
        sampling = [(c, result.rows[i]) for i, c in enumerate(sched.chunks) if c.sample]
        for chunk, rows in ((c, result.rows[i]) for i, c in enumerate(sched.chunks)):
            if chunk.prompt_logits:
                self._prompt_logprobs(chunk, result.logits[rows])
        if not sampling:
            return
        last_rows = torch.tensor([rows.stop - 1 for _, rows in sampling])
        samples = sample(result.logits[last_rows], [c.req.sampler for c, _ in sampling])
        now = time.monotonic()
        for (chunk, _), s in zip(sampling, samples):
            req = chunk.req
            if req.first_token_time is None:
                req.first_token_time = now
            self._append(req, s)
            changed[req.id] = req

    def _prompt_logprobs(self, chunk, rows: torch.Tensor) -> None:
        req = chunk.req
        n_prompt_rows = min(chunk.num_tokens, req.num_prompt - 1 - chunk.start)
        if n_prompt_rows <= 0:
            return
        next_ids = req.prompt_ids[chunk.start + 1:chunk.start + 1 + n_prompt_rows]
        for s in prompt_logprobs_for(rows[:n_prompt_rows], next_ids, req.params.prompt_logprobs):
            req.prompt_logprobs.append(s.top_logprobs)

    def _append(self, req: Request, s) -> None:
        token = s.token_id
        req.all_ids.append(token)
        req.sampler.append(token)
        self.stats["generated_tokens"] += 1
        if req.logprobs is not None:
            req.logprobs.append(s.top_logprobs or {token: s.logprob})
        params = req.params
        stopped_by_token = (
            req.num_output >= params.min_tokens
            and (token in req.stop_ids
                 or (not params.ignore_eos and token in self.eos_token_ids)))
        # A stopping token adds no text, except a stop_token_id shown with special tokens kept.
        shown = not stopped_by_token or (token in req.stop_ids
                                         and not params.skip_special_tokens)
        if req.detok is not None and shown:
            req.text += req.detok.step(token)
        if stopped_by_token:
            self._flush(req)  # hand out what the detokenizer still holds, as "length" does
            self._finish(req, "stop")
            return
        if params.stop and req.num_output >= params.min_tokens and self._check_stop_strings(req):
            self._finish(req, "stop")
            return
        if len(req.all_ids) >= req.max_total_tokens:
            self._finish(req, "length")

    def _check_stop_strings(self, req: Request) -> bool:
        params = req.params
        longest = max(len(s) for s in params.stop)
        # Only the new text (plus an overlap for stops spanning the boundary) can hold a match.
        lo = max(0, req.sent_text - longest)
        best = None
        for stop in params.stop:
            at = req.text.find(stop, lo)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        req.text = req.text[:at + len(stop)] if params.include_stop_str_in_output \
            else req.text[:at]
        return True

    def _finish(self, req: Request, reason: str) -> None:
        if reason == "length":
            self._flush(req)
        self.scheduler.finish(req, reason)

    @staticmethod
    def _flush(req: Request) -> None:
        """Append text the detokenizer holds back (an incomplete character at the end)."""
        if req.detok is not None:
            req.text += req.detok.flush()

    def _output(self, req: Request) -> Output:
        text = req.text
        if req.finish_reason is None and req.params.stop:
            # Hold back what could still turn out to be the start of a stop string.
            hold = max(len(s) for s in req.params.stop) - 1
            visible = max(req.sent_text, len(text) - hold)
        else:
            visible = len(text)
        delta_text = text[req.sent_text:visible]
        req.sent_text = visible
        delta_ids = req.output_ids[req.sent_tokens:]
        req.sent_tokens = req.num_output
        if req.finish_reason is not None:
            req.finish_time = req.finish_time or time.monotonic()
        return Output(
            request_id=req.id, prompt=req.prompt_text, prompt_token_ids=req.prompt_ids,
            text=text[:visible], token_ids=req.output_ids, finish_reason=req.finish_reason,
            delta_text=delta_text, delta_token_ids=delta_ids,
            logprobs=list(req.logprobs) if req.logprobs is not None else None,
            prompt_logprobs=req.prompt_logprobs if req.finish_reason else None,
            error=req.error, num_cached_tokens=req.num_cached_tokens,
            metrics={"arrival": req.arrival, "first_scheduled": req.first_scheduled_time,
                     "first_token": req.first_token_time, "finish": req.finish_time,
                     "preemptions": req.num_preemptions})

    # ---- convenience loops ----------------------------------------------------------------
    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, progress: bool = False) -> list[Output]:
        """Run all prompts through the batcher; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        done: dict[str, Output] = {}
        bar = _progress(len(ids)) if progress else None
        while len(done) < len(ids):
            for out in self.step():
                if out.finished and out.request_id in ids:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[i] for i in ids]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None
               ) -> Iterator[Output]:
        """Yield this request's Outputs as tokens arrive (read `delta_text`); other queued
        requests advance in the same steps. Closing the generator aborts the request."""
        rid = self.add_request(prompt, params)
        finished = False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.abort(rid)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="generate")
