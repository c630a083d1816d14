"""The engine: load an engine directory, then serve requests with in-flight batching.

`Engine` is synchronous and single-threaded: `add_request` queues, `step` runs one batch and
returns what changed, `generate`/`stream` loop over `step`. `AsyncEngine` (runtime.async_engine)
runs the same loop on a thread for asyncio callers.

Around the loop: runtime.kv_budget sizes the KV cache, runtime.backend chooses the step backend
and builds its runner, runtime.multi_rank starts the other ranks of a multi-rank engine, and
runtime.output turns each sampled token into text, stop decisions and `Output`s.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_engine.runtime.backend import (
    backend_info,
    choose_backend,
    describe_backend,
    make_runner,
)
from llm_engine.runtime.block_manager import BlockManager
from llm_engine.runtime.cluster import Cluster
from llm_engine.runtime.engine_dir import EngineFiles, EngineLoadError, load_engine_dir
from llm_engine.runtime.executor import Executor, KVCache, KVCacheSpec
from llm_engine.runtime.kv_budget import kv_cache_blocks
from llm_engine.runtime.multi_rank import load_ranks
from llm_engine.runtime.output import Output, append_token, flush, make_output
from llm_engine.runtime.rank_files import engine_ranks, pipeline_stages, tensor_parallel
from llm_engine.runtime.request import MAX_CACHE_SALT_CHARS, Request, Status
from llm_engine.runtime.sampling import SamplerState, prompt_logprobs_for, sample
from llm_engine.runtime.sampling_params import SamplingParams
from llm_engine.runtime.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

# What malformed plan values raise from inside the runtime (ValueError is the caller's: bad
# options keep their type).
_MALFORMED = (KeyError, TypeError, IndexError, ZeroDivisionError, OverflowError,
              AttributeError, RecursionError)


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
    # speculative decoding (runtime.speculative): "ngram" (prompt lookup) or "draft" (a
    # draft engine directory with the same tokenizer); None: off
    speculative: str | None = None
    num_speculative_tokens: int = 4  # K: the most drafts per request and step
    draft_engine: str | None = None
    ngram_min: int = 2
    ngram_max: int = 4
    speculative_adaptive: bool = True  # K and on/off by measured acceptance and step cost


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
        self.kernel_backend = choose_backend(config.kernels, device,
                                             files if cluster is None else None)
        # The fast path's attention pads each sequence's query rows to the step's longest
        # chunk; twice the token budget leaves a prompt a chunk of 2x budget / sequences.
        padded = (max(2 * max_batch_tokens, config.max_num_seqs)
                  if self.kernel_backend == "onnx" else None)
        self.scheduler = Scheduler(
            SchedulerConfig(max_batch_tokens=max_batch_tokens, max_num_seqs=config.max_num_seqs,
                            max_seq_len=self.max_seq_len, max_padded_rows=padded), self.blocks)
        runner = make_runner(files, config, self.kernel_backend, device)
        self.backend_info = backend_info(self.kernel_backend, runner, device)
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
        self.speculator = self._speculator(config, num_blocks, device)
        # structured outputs: requests whose grammar is still compiling (off this thread)
        self._compiling: list[Request] = []
        self._grammars: Any = None  # runtime.structured.GrammarCompiler, on first use
        self._grammar_tokenizer: Any = None

    def _speculator(self, config: EngineConfig, num_blocks: int, device: str):
        if config.speculative is None:
            return None
        from llm_engine.runtime.speculative import SpeculativeConfig, Speculator

        spec = SpeculativeConfig(config.speculative, config.num_speculative_tokens,
                                 config.draft_engine, config.ngram_min, config.ngram_max,
                                 config.speculative_adaptive)
        draft = None
        if spec.method == "draft":
            from llm_engine.runtime.speculative.draft import DraftModel

            # as many blocks as the target's: the draft can hold whatever the target does
            draft = DraftModel(spec.draft_engine, config, device, num_blocks, self.meta)
        # the fast path computes sequences x longest chunk rows (the scheduler's padded bound)
        return Speculator(spec, draft, padded=self.scheduler.config.max_padded_rows is not None)

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
            return load_ranks(Path(path), device, config, world_size,
                              lambda files, cluster: cls(files, config, device, cluster))
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
    def backend_summary(self) -> str:
        """The step backend and what it chose on this machine (threads, the CPU's ISA)."""
        return describe_backend(self.backend_info)

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
            from llm_engine.runtime.detokenizer import IncrementalDetokenizer

            req.detok = IncrementalDetokenizer(self.tokenizer, ids,
                                               skip_special_tokens=params.skip_special_tokens)
        if params.logprobs is not None:
            req.logprobs = []
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]  # the first token has no prediction
        if params.structured is not None:
            if any(r.id == req.id for r in self._compiling):
                raise ValueError(f"request id {req.id!r} is already in use")
            req.grammar = self._compile(params.structured)
            self._compiling.append(req)  # admitted once compiled (step)
        else:
            self.scheduler.add(req)
        self.stats["prompt_tokens"] += len(ids)
        return req.id

    def _compile(self, spec):
        """The grammar's compile for this engine's tokenizer, started on a worker thread
        (cached by spec and tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("structured outputs need the engine's tokenizer; this engine "
                             "takes token ids only")
        if self._grammars is None:
            from llm_engine.runtime.structured.compiler import (
                GrammarCompiler,
                from_runtime_tokenizer,
            )

            eos = self.eos_token_ids or list(self.tokenizer.eos_token_ids)
            if not eos:
                raise ValueError("structured outputs need an end-of-sequence token; this "
                                 "engine has none")
            self._grammar_tokenizer = from_runtime_tokenizer(self.tokenizer)
            self._grammars = GrammarCompiler()
        return self._grammars.submit(spec, self._grammar_tokenizer)

    def _admit_compiled(self, changed: dict[str, Request]) -> None:
        """Requests whose grammar finished compiling join the scheduler; a grammar that
        failed ends its request with the compiler's message. The others wait without
        holding anyone up."""
        waiting = []
        for req in self._compiling:
            if not req.grammar.done():
                waiting.append(req)
                continue
            try:
                req.matcher = req.grammar.result().matcher()
            except ValueError as e:
                req.status, req.finish_reason = Status.FINISHED, "error"
                req.error = f"structured output: {e}"
                changed[req.id] = req
                continue
            self.scheduler.add(req)
        self._compiling = waiting

    def abort(self, request_id: str) -> Output | None:
        for req in self._compiling:
            if req.id == request_id:
                self._compiling.remove(req)
                req.status, req.finish_reason = Status.FINISHED, "abort"
                return make_output(req)
        req = self.scheduler.abort(request_id)
        return make_output(req) if req is not None else None

    def has_unfinished(self) -> bool:
        return bool(self._compiling) or self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self._compiling) + len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[Output]:
        """Run one batch. Returns an Output for every request that produced tokens or
        finished during the step. On a multi-rank engine, raises RankFailedError naming the
        rank when one dies; the engine is stopped from then on (`healthy`, `error`)."""
        self._check_healthy()
        start = time.perf_counter()
        early: dict[str, Request] = {}
        if self._compiling:
            self._admit_compiled(early)
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self.scheduler.requests)
        sched = self.scheduler.schedule()
        changed: dict[str, Request] = {**early, **{r.id: r for r in sched.finished}}
        for req in sched.finished:  # ended by the scheduler (cache full): emit held-back text
            if req.finish_reason == "length":
                flush(req)
        if sched.chunks:
            self._run(sched, changed)
            if self.speculator is not None:
                # The whole step, host work included (drafts cost sampling and verification
                # too); a draft engine's time is measured apart.
                rows = sched.num_tokens if not self.speculator.padded else \
                    len(sched.chunks) * max(c.num_tokens for c in sched.chunks)
                self.speculator.step_done(rows, time.perf_counter() - start)
        self.stats["steps"] += 1
        return [make_output(r) for r in changed.values()]

    def _run(self, sched: SchedulerOutput, changed: dict[str, Request]) -> None:
        tables = [self.blocks.block_table(c.req.id) for c in sched.chunks]
        scheduled = time.monotonic()
        for c in sched.chunks:
            if c.req.first_scheduled_time is None:
                c.req.first_scheduled_time = scheduled
        # grammar masks fill on a worker thread while the model runs (none before a grammar)
        masks = self._start_masks(sched.chunks) if self._grammars is not None else None
        try:
            result = self.executor.run(sched.chunks, tables, sched.copies)
        except BaseException as e:
            if masks is not None:
                futures.wait([masks.fill])  # it reads the matchers: let it finish first
            if self.cluster is None:
                raise
            failure = self.cluster.fail(e)  # the ranks are out of step now: stop them all
            if isinstance(e, Exception):
                raise failure from e
            raise  # KeyboardInterrupt and the like stay what they are
        if masks is not None:
            masks.wait()  # before any matcher advances
        self.scheduler.update(sched)
        for i, c in enumerate(sched.chunks):
            if c.draft:
                rows = result.logits[result.rows[i]]
                self._verify(c, masks.chunk(i, rows) if masks is not None else rows, changed)
        sampling = [(c, result.rows[i]) for i, c in enumerate(sched.chunks)
                    if c.sample and not c.draft]
        for chunk, rows in ((c, result.rows[i]) for i, c in enumerate(sched.chunks)):
            if chunk.prompt_logits:
                self._prompt_logprobs(chunk, result.logits[rows])
        sampling = self._finish_prompt_only(sampling, changed)
        if not sampling:
            return
        last_rows = [rows.stop - 1 for _, rows in sampling]
        logits = result.logits
        if last_rows != list(range(logits.shape[0])):  # a decode step's rows are all sampled
            logits = logits[torch.tensor(last_rows)]
        if masks is not None:
            # one mask tensor for the step's sampled rows; unconstrained rows are all-ones
            index = {id(c): i for i, c in enumerate(sched.chunks)}
            logits = masks.sampled([index[id(c)] for c, _ in sampling], logits)
        samples = sample(logits, [c.req.sampler for c, _ in sampling])
        now = time.monotonic()
        for (chunk, _), s in zip(sampling, samples):
            self._emit(chunk.req, s, now)
            changed[chunk.req.id] = chunk.req

    def _emit(self, req: Request, s, now: float) -> bool:
        """One sampled token into the request, through the stop checks and its grammar;
        False once that finished the request."""
        if req.first_token_time is None:
            req.first_token_time = now
        self.stats["generated_tokens"] += 1
        reason = append_token(req, s, self.eos_token_ids)
        if reason is None and req.matcher is not None:
            reason = self._follow_grammar(req, s.token_id)
        if reason is None:
            return True
        self.scheduler.finish(req, reason, error=req.error)
        return False

    def _verify(self, chunk, rows: torch.Tensor, changed: dict[str, Request]) -> None:
        """Keep what verification accepts of a speculative chunk's drafts, token by token
        through the usual stop checks (runtime.speculative.verify)."""
        from llm_engine.runtime.speculative.verify import verify

        req = chunk.req
        emitted = 0

        def emit(s) -> bool:
            nonlocal emitted
            emitted += 1
            return self._emit(req, s, time.monotonic())

        kept = verify(rows, chunk.draft, req.spec.q, req.sampler, emit)
        self.scheduler.accept(req, kept)
        self.speculator.verified(req, len(chunk.draft), kept, emitted)
        changed[req.id] = req

    @staticmethod
    def _start_masks(chunks: list) -> Any:
        from llm_engine.runtime.structured.step_masks import start_step_masks

        return start_step_masks(chunks)

    @staticmethod
    def _follow_grammar(req: Request, token: int) -> str | None:
        """Advance the request's grammar past its sampled token (allowed by the mask); "stop"
        once the grammar is complete."""
        try:
            req.matcher.advance(token)
        except ValueError as e:  # cannot happen for a masked sample: a runtime bug
            req.error = f"structured output: {e}"
            return "error"
        return "stop" if req.matcher.is_finished() else None

    def _finish_prompt_only(self, sampling: list, changed: dict[str, Request]) -> list:
        """Scoring requests (max_tokens=0, with prompt_logprobs) end with "length" once their
        prompt's last chunk has run, its logprobs taken: nothing is sampled for them. Returns
        the chunks still to sample."""
        rest = []
        for chunk, rows in sampling:
            req = chunk.req
            if req.params.max_tokens == 0:
                self.scheduler.finish(req, "length")
                changed[req.id] = req
            else:
                rest.append((chunk, rows))
        return rest

    def _prompt_logprobs(self, chunk, rows: torch.Tensor) -> None:
        req = chunk.req
        n_prompt_rows = min(chunk.num_tokens, req.num_prompt - 1 - chunk.start)
        if n_prompt_rows <= 0:
            return
        next_ids = req.prompt_ids[chunk.start + 1:chunk.start + 1 + n_prompt_rows]
        for s in prompt_logprobs_for(rows[:n_prompt_rows], next_ids, req.params.prompt_logprobs):
            req.prompt_logprobs.append(s.top_logprobs)

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
