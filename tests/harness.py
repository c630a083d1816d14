"""A small paged-KV driver over the plan runner, for comparing engines with HF.

It runs several sequences at once in one flat token batch per step, with prefill chunks and
decode tokens mixed, and gives each sequence blocks drawn at random from a shuffled pool so
block tables are never contiguous. The runtime's scheduler is the production driver; this one
is deliberately simple so the tests check the engine, not the scheduler.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm_engine.runtime.engine_dir import load_engine_dir
from llm_engine.runtime.executor import KVCache, KVCacheSpec
from llm_engine.runtime.plan import PlanRunner


@dataclass
class _Seq:
    tokens: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)


class PagedRunner:
    def __init__(self, engine_dir: Path, block_size: int = 4, num_blocks: int = 512,
                 seed: int = 0, rank: int = 0, comm=None, backend: str = "reference") -> None:
        """`rank` and `comm` run one rank of a tensor-parallel engine (see ThreadGroup);
        backend="onnx" runs the engine's ONNX graph (the CPU fast path) instead of the plan."""
        files = load_engine_dir(engine_dir, rank=rank)
        self.meta = files.meta
        self.block_size = block_size
        # The runtime's cache object: it carries the KV tensors and `comm` the plan's ops read.
        self.cache = KVCache(KVCacheSpec(num_blocks, block_size,
                                         files.plan["kv_cache"]["layers"]), comm=comm)
        self.kv_caches = self.cache.kv_caches
        if backend == "onnx":
            from llm_engine.runtime.onnx_backend import OnnxRunner

            self.runner = OnnxRunner(Path(engine_dir), files.plan, threads=1)
        else:
            self.runner = PlanRunner(files.plan, files.weights)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.seqs: dict[int, _Seq] = {}

    def step(self, work: list[tuple[int, list[int]]], all_rows: bool = False):
        """Run one flat batch; work = [(seq id, new tokens)]. Returns {id: logits rows}."""
        ids, pos, slots, starts, lens, rows = [], [], [], [0], [], []
        tables = []
        for sid, new in work:
            seq = self.seqs.setdefault(sid, _Seq())
            first = len(seq.tokens)
            seq.tokens += new
            while len(seq.blocks) * self.block_size < len(seq.tokens):
                seq.blocks.append(self.free.pop())
            for i, tok in enumerate(new):
                p = first + i
                ids.append(tok)
                pos.append(p)
                slots.append(seq.blocks[p // self.block_size] * self.block_size
                             + p % self.block_size)
            row0 = starts[-1]
            starts.append(row0 + len(new))
            lens.append(len(seq.tokens))
            tables.append(seq.blocks)
            rows += list(range(row0, row0 + len(new))) if all_rows else [row0 + len(new) - 1]
        width = max(len(t) for t in tables)
        feeds = {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([pos]),
            "slot_mapping": torch.tensor(slots),
            "block_tables": torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                         dtype=torch.int32),
            "context_lens": torch.tensor(lens, dtype=torch.int32),
            "query_start_loc": torch.tensor(starts, dtype=torch.int32),
            "logits_indices": torch.tensor(rows),
        }

        logits = self.run(feeds)[0]
        out, r = {}, 0
        for sid, new in work:
            n = len(new) if all_rows else 1
            out[sid] = logits[r:r + n]
            r += n
        return out

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        # clone: the fast path's logits buffer is reused by the next step
        return self.runner.run(feeds, self.cache)[0].clone()

    def greedy(self, prompts: list[list[int]], max_new: int, chunk: int = 5) -> list[list[int]]:
        """Greedy decoding of all prompts together: prompt i arrives at step i and is
        prefilled in chunks of `chunk` tokens while earlier ones decode."""
        pending = {i: list(p) for i, p in enumerate(prompts)}
        generated: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        base = max(self.seqs, default=-1) + 1
        step = 0
        while any(len(g) < max_new for g in generated.values()):
            work = []
            for i in range(min(step + 1, len(prompts))):
                if pending[i]:
                    work.append((i, pending[i][:chunk]))
                elif len(generated[i]) < max_new:
                    work.append((i, [generated[i][-1]]))
            out = self.step([(base + i, toks) for i, toks in work])
            for i, toks in work:
                if pending[i]:
                    pending[i] = pending[i][len(toks):]
                    if pending[i]:
                        continue  # mid-prompt chunk: its logits are not a prediction yet
                generated[i].append(int(out[base + i][-1].argmax()))
            step += 1
        return [generated[i] for i in range(len(prompts))]


class ThreadGroup:
    """The ranks of a tensor-parallel engine as threads of this process, for checking the
    partitioner's arithmetic (the runtime's ranks are processes on torch.distributed)."""

    def __init__(self, size: int) -> None:
        import threading

        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size

    def comm(self, rank: int):
        group = self

        class _Comm:
            def all_gather(self, x):
                group.slots[rank] = x
                group.barrier.wait()
                parts = list(group.slots)
                group.barrier.wait()
                return parts

            def all_reduce(self, x):
                return torch.stack(self.all_gather(x)).sum(0)  # the same order on every rank

        return _Comm()

    def run(self, fn):
        """fn(rank) on every rank concurrently; returns the results in rank order."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.size) as pool:
            return list(pool.map(fn, range(self.size)))


class PipelineRunner(PagedRunner):
    """All stages of a pipeline-parallel engine in this process, run one after another with
    each stage's outputs fed to the next (the runtime's stages are processes)."""

    def __init__(self, engine_dir: Path, stages: int, **kwargs) -> None:
        super().__init__(engine_dir, **kwargs)
        self.stages = [(self.runner, self.cache)]
        for rank in range(1, stages):
            other = PagedRunner(engine_dir, rank=rank, **kwargs)
            self.stages.append((other.runner, other.cache))

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {}
        for runner, cache in self.stages:
            outs = runner.run({**feeds, **values}, cache)
            values = {"pp." + name: v for name, v in zip(runner.outputs, outs)}
        return outs[0]


# Engines whose activations (or KV cache) are quantized at run time: two executors of one
# engine may round a value to different sides of a quantization boundary, because upstream
# float sums differ in order (another CPU's GEMM blocking). Measured on the tiny llama int8-sq
# engine: a 1-ulp change before the activation quantizer moved a logprob by 1.6e-3. Weight-only
# engines have no run-time rounding and keep the float tolerance.
RUNTIME_QUANT_LOGPROB_ATOL = 0.02


def assert_same_generation(ref, got, atol: float, prompt_logprobs: bool = False) -> None:
    """Outputs of two executors of one engine (greedy, with logprobs) agree: logprobs within
    `atol` and the same tokens, except that a token may differ where the reference's two best
    candidates are within 2 * atol of each other (a near tie, which rounding can break either
    way); the sequence is compared up to there."""
    for r, g in zip(ref, got, strict=True):
        if prompt_logprobs:
            for rl, gl in zip(r.prompt_logprobs[1:], g.prompt_logprobs[1:], strict=True):
                assert rl.keys() == gl.keys()
                for k in rl:
                    assert abs(gl[k] - rl[k]) <= atol, (k, gl[k], rl[k])
        for i, (rt, gt) in enumerate(zip(r.token_ids, g.token_ids)):
            rl, gl = r.logprobs[i], g.logprobs[i]
            for k in rl.keys() & gl.keys():
                assert abs(gl[k] - rl[k]) <= atol, (i, k, gl[k], rl[k])
            if rt != gt:
                best = sorted(rl.values(), reverse=True)
                assert len(best) > 1 and best[0] - best[1] <= 2 * atol, \
                    f"token {i}: {gt} != {rt}, and the reference's choice was no near tie {best}"
                break
        else:
            assert r.token_ids == g.token_ids
