"""Before a build keeps its CPU fast-path graph: load it in onnxruntime and run one step
against the plan's reference executor.

A graph onnxruntime refuses (a type it has no kernel for) or that computes something else
than the plan would only fail, or worse answer wrongly, on the user's machine at load. So the
builder runs the graph it just wrote on random tokens in one mixed step (two sequences
prefilling over shuffled cache blocks, one of them continuing after a cached prefix, the
context longer than any sliding window) beside the reference executor, and leaves the graph
out, with the reason in report.json, unless the logits agree.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

# Relative error allowed between the two backends' logits. fp32 graphs agree to ~1e-6. A
# bf16/fp16 engine's reference rounds every activation to 8 (11) bits where the graph
# computes in fp32: ~1e-2 on random tokens. The quantized formats' ONNX lowerings round
# activations differently from the reference (per block for MatMulNBits, a 255-level grid
# for W8A8), up to a few percent.
TOLERANCE = {"float32": 1e-3, "half": 5e-2, "quantized": 0.15}
BLOCK = 4


def _feeds(work: list[tuple[list[int], list[int], int]], block: int) -> dict[str, torch.Tensor]:
    """One flat step: work = [(blocks, new token ids, tokens already cached)]."""
    ids, pos, slots, starts, lens, tables = [], [], [], [0], [], []
    for blocks, new, cached in work:
        for i, tok in enumerate(new):
            p = cached + i
            ids.append(tok)
            pos.append(p)
            slots.append(blocks[p // block] * block + p % block)
        starts.append(starts[-1] + len(new))
        lens.append(cached + len(new))
        tables.append(blocks)
    width = max(len(t) for t in tables)
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]),
            "slot_mapping": torch.tensor(slots),
            "block_tables": torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                         dtype=torch.int32),
            "context_lens": torch.tensor(lens, dtype=torch.int32),
            "query_start_loc": torch.tensor(starts, dtype=torch.int32),
            "logits_indices": torch.arange(len(ids))}


def check_graph(engine_dir: Path, plan: dict[str, Any], kind: str, vocab: int,
                seed: int = 0) -> str | None:
    """None when the ONNX graph in `engine_dir` runs and matches the plan to TOLERANCE[kind],
    else why not."""
    from llm_engine.runtime.engine_dir import EngineLoadError, map_safetensors
    from llm_engine.runtime.executor import KVCache, KVCacheSpec
    from llm_engine.runtime.onnx_backend import OnnxRunner
    from llm_engine.runtime.plan import PlanRunner

    layers = plan["kv_cache"]["layers"]
    windows = [w for w in (layer.get("window") for layer in layers) if w]
    context = max([24, *[w + 8 for w in windows]])  # past every sliding window
    n_a = -(-context // BLOCK)
    pool = list(range(n_a + 3 + 2))  # two blocks nobody uses: stray writes would land there
    random.Random(seed).shuffle(pool)
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(0, vocab, (n,), generator=g).tolist() for n in (context, 9))
    blocks_a, blocks_b = pool[:n_a], pool[n_a:n_a + 3]
    steps = [[(blocks_a, a[:-5], 0), (blocks_b, b[:4], 0)],        # two prefills
             [(blocks_a, a[-5:], len(a) - 5), (blocks_b, b[4:], 4)]]  # continued, mixed
    try:
        runner = OnnxRunner(engine_dir, plan, threads=1)
    except EngineLoadError as e:
        return f"onnxruntime cannot load the graph: {e}"
    weights, mapped = map_safetensors(engine_dir / "weights.rank0.safetensors")
    ref = PlanRunner(plan, weights)
    caches = [KVCache(KVCacheSpec(len(pool), BLOCK, layers)) for _ in range(2)]
    worst = 0.0
    for work in steps:
        feeds = _feeds(work, BLOCK)
        want = ref.run(dict(feeds), caches[0])[0].float()
        try:
            got = runner.run(dict(feeds), caches[1])[0].float().clone()
        except Exception as e:  # onnxruntime's own error types, from a graph we wrote
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            return f"onnxruntime fails to run the graph: {first}"
        if got.shape != want.shape or not torch.isfinite(got).all():
            return f"the graph's logits are {tuple(got.shape)} (non-finite values or another " \
                   f"shape than the plan's {tuple(want.shape)})"
        worst = max(worst, float((got - want).norm() / want.norm().clamp_min(1e-30)))
    del ref, weights
    mapped.close()
    limit = TOLERANCE[kind]
    if worst > limit:
        return (f"the graph's logits differ from the reference executor's by {worst:.2e} "
                f"(relative, more than {limit:g}) on a test step")
    return None
