#!/usr/bin/env python
"""Per-op benchmark: paged attention (one layer) on its own, on the CPU: decode (B sequences,
one new token each over a context of L tokens) and prefill (one sequence of T new tokens).

Two paths on the same inputs and the same paged cache (fp32, blocks shuffled as the block
manager hands them out):

* torch: `kernels.attention.paged_attention`, the reference (what `--kernels reference`
  runs): writes the step's K/V into the cache, then attends (decode: one padded, masked SDPA
  over all sequences; prefill: one SDPA per sequence).
* ort: the exporter's lowering (`builder.onnx_export._Emitter.op_paged_attention`, with its
  `build()` for the graph's inputs and outputs) of a plan holding only the attention node and
  the reshapes / transposes a real plan puts around it (q/k/v as [1, T, heads·d] projection
  rows in, [1, T, h·d] rows out), run by the fast path's own step
  (`runtime.onnx_backend.OnnxRunner.run`: the per-step metadata, the cache and outputs bound
  by address, the session run, then the step's K/V (`kv_new`) scattered into the cache).
  `ort us` is that whole step; the metadata (`attention_metadata`: padded query rows,
  context slots, mask), which the runtime builds once for all layers of a step, is also
  timed on its own (`meta us`), so a real step pays `ort us - meta us` per layer plus
  `meta us` once.

Each number is the median of single calls after a warm-up, the two paths' calls interleaved
(the JSON also has min and p90); `rel err` is ||ort - torch|| / ||torch|| of the output.
RoPE is left out on both paths (the fused RoPE of a real plan needs its cos/sin producers),
so this is the attention core: cache write, gather, scores, softmax, weighted sum.
GB/s counts the K and V bytes of the context read from the cache; GFLOP/s counts the
4·h·d multiply-adds per (query, key) pair the causal mask allows.

    python -P benchmarks/ops/attention.py [--batch 1 16 64] [--context 128 512 2048] \
        [--prefill 128 512] [--heads 9 --kv-heads 3 --head-dim 64 --block-size 16] \
        [--threads N] [--quick] [--out benchmarks/results/ops_attention.json]

Defaults: SmolLM2-135M's attention (9 query heads, 3 KV heads, head size 64), block size 16,
threads = physical cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# This folder, never the repository root (module docstring of common.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

DEFAULT_OUT = common.RESULTS / "ops_attention.json"


@dataclass(frozen=True)
class Case:
    kind: str  # "decode" or "prefill"
    batch: int  # sequences
    context: int  # tokens of each sequence in the cache after this step
    new: int  # new tokens per sequence this step

    @property
    def tokens(self) -> int:
        return self.batch * self.new


def export_attention(h: int, kvh: int, d: int, folder: Path):
    """The exporter's graph for a plan of one paged_attention node (module docstring), saved
    as folder/model.onnx. Returns the model and the plan."""
    from safetensors.torch import save_file

    from llm_engine.builder.onnx_export import _Emitter

    def node(name, op, inputs, shape, dtype="float32", attrs=None):
        return {"name": name, "op": op, "inputs": inputs, "attrs": attrs or {},
                "shape": shape, "dtype": dtype}

    meta = [node(n, "input", [], shape, dtype, {"name": n}) for n, shape, dtype in (
        ("slot_mapping", ["T"], "int64"), ("block_tables", [-1, -1], "int32"),
        ("context_lens", [-1], "int32"), ("query_start_loc", [-1], "int32"))]
    nodes = []
    for x, heads in (("q", h), ("k", kvh), ("v", kvh)):
        nodes += [node(f"{x}_rows", "input", [], [1, "T", heads * d], attrs={"name": f"{x}_rows"}),
                  node(f"{x}_view", "reshape", [f"{x}_rows"], [1, "T", heads, d],
                       attrs={"shape": [1, -1, heads, d]}),
                  node(x, "transpose", [f"{x}_view"], [1, heads, "T", d],
                       attrs={"dim0": 1, "dim1": 2})]
    nodes += meta
    nodes += [node("attn", "paged_attention", ["q", "k", "v", *(m["name"] for m in meta)],
                   [1, h, "T", d], attrs={"layer": 0, "scale": d**-0.5, "window": None,
                                          "num_heads": h, "num_kv_heads": kvh, "head_dim": d}),
              node("attn_t", "transpose", ["attn"], [1, "T", h, d], attrs={"dim0": 1, "dim1": 2}),
              node("out", "reshape", ["attn_t"], [1, "T", h * d],
                   attrs={"shape": [1, -1, h * d]})]
    plan = {"inputs": [{"name": n["name"], "node": n["name"], "shape": n["shape"],
                        "dtype": n["dtype"]} for n in nodes if n["op"] == "input"],
            "outputs": ["out"], "nodes": nodes,
            "kv_cache": {"layers": [{"num_kv_heads": kvh, "head_dim": d, "dtype": "float32",
                                     "window": None}]}}
    save_file({}, str(folder / "weights.safetensors"))  # the emitter reads its header
    model = _Emitter(plan, folder / "weights.safetensors").build()
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return model, plan


def make_inputs(case: Case, h: int, kvh: int, d: int, bs: int, gen) -> dict[str, Any]:
    """Cache (random history), block tables over shuffled blocks, this step's q/k/v rows and
    the metadata the scheduler would give the step."""
    import torch

    nb = -(-case.context // bs)
    num_blocks = case.batch * nb
    tables = torch.randperm(num_blocks, generator=gen).view(case.batch, nb).to(torch.int32)
    stacked = torch.randn(1, 2, num_blocks, bs, kvh, d, generator=gen)
    past = case.context - case.new
    pos = torch.arange(past, case.context)
    slots = (tables[:, pos // bs].long() * bs + pos % bs).flatten()  # sequence-major
    t = case.tokens
    return {
        "stacked": stacked,
        "q_rows": torch.randn(1, t, h * d, generator=gen),
        "k_rows": torch.randn(1, t, kvh * d, generator=gen),
        "v_rows": torch.randn(1, t, kvh * d, generator=gen),
        "slot_mapping": slots,
        "block_tables": tables,
        "context_lens": torch.full((case.batch,), case.context, dtype=torch.int32),
        "query_start_loc": torch.arange(0, t + 1, case.new, dtype=torch.int32),
    }


def bench_case(case: Case, runner, args, gen) -> dict[str, Any]:
    import torch

    from llm_engine.kernels.attention import paged_attention
    from llm_engine.runtime.onnx_backend import attention_metadata

    h, kvh, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    inp = make_inputs(case, h, kvh, d, bs, gen)
    stacked = inp["stacked"]
    t = case.tokens
    timing = dict(warmup=args.warmup, reps=args.reps, min_time=args.min_time)

    # torch reference: [1, heads, T, d] views of the rows, as the plan's reshape + transpose
    def view(x, heads):
        return inp[f"{x}_rows"].view(1, t, heads, d).transpose(1, 2)

    q, k, v = view("q", h), view("k", kvh), view("v", kvh)
    ctx = SimpleNamespace(kv_caches=[(stacked[0, 0], stacked[0, 1])])
    meta_args = [inp[n] for n in ("slot_mapping", "block_tables", "context_lens",
                                  "query_start_loc")]

    def torch_call():
        return paged_attention(q, k, v, *meta_args, ctx=ctx, layer=0, scale=d**-0.5,
                               num_heads=h, num_kv_heads=kvh, head_dim=d)

    want = torch_call().transpose(1, 2).reshape(1, t, h * d)

    # onnxruntime: the runtime's own step (runtime.onnx_backend.OnnxRunner.run: metadata,
    # binding, the session run, the K/V scatter into the cache)
    def metadata():
        return attention_metadata(inp, bs, [])

    t_meta = common.time_us(metadata, **timing)
    feeds = {**inp, "logits_indices": torch.arange(t)}
    cache = SimpleNamespace(stacked=stacked)
    kv_before = stacked.clone()

    def ort_call():
        return runner.run(feeds, cache)[0]

    got = ort_call().clone()  # the runner reuses its output buffer
    kv_new = stacked.view(2, -1, kvh, d)[:, inp["slot_mapping"]].clone()
    stacked.copy_(kv_before)
    t_torch, t_ort = common.time_many([torch_call, ort_call], **timing)

    # the K/V the graph hands back are this step's own (no RoPE here): the rows as they came
    kv_want = torch.stack([inp["k_rows"].view(t, kvh, d), inp["v_rows"].view(t, kvh, d)])
    pairs = case.batch * sum(min(case.context, case.context - case.new + i + 1)
                             for i in range(case.new))  # (query, key) pairs the mask allows
    kv_bytes = case.batch * case.context * kvh * d * 2 * stacked.element_size()
    row = {"case": case.kind, "batch": case.batch, "context": case.context, "new": case.new,
           "tokens": t, "heads": h, "kv_heads": kvh, "head_dim": d, "block_size": bs,
           "torch": t_torch, "ort": t_ort, "meta": t_meta, "kv_bytes": kv_bytes,
           "rel_err_ort_vs_torch": common.rel_err(got, want),
           "kv_new_max_abs_err": float((kv_new - kv_want).abs().max())}
    for path in ("torch", "ort"):
        us = row[path]["median_us"]
        row[f"gbps_{path}"] = kv_bytes / us / 1e3
        row[f"gflops_{path}"] = 4.0 * h * d * pairs / us / 1e3
    print(f"  {case.kind:7s} B={case.batch:3d} L={case.context:5d} new={case.new:4d}: torch "
          f"{t_torch['median_us']:9.1f} us, ort {t_ort['median_us']:9.1f} us, rel err "
          f"{row['rel_err_ort_vs_torch']:.1e}", file=sys.stderr, flush=True)
    return row


HEADER = ("case", "B", "context", "new tokens", "torch us", "ort us", "ort speedup",
          "meta us", "GB/s torch / ort", "GFLOP/s torch / ort", "rel err")


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        t, o = r["torch"]["median_us"], r["ort"]["median_us"]
        body.append((r["case"], r["batch"], r["context"], r["new"], common.fmt(t),
                     common.fmt(o), f"{t / o:.2f}x", common.fmt(r["meta"]["median_us"]),
                     f"{common.fmt(r['gbps_torch'])} / {common.fmt(r['gbps_ort'])}",
                     f"{common.fmt(r['gflops_torch'])} / {common.fmt(r['gflops_ort'])}",
                     f"{r['rel_err_ort_vs_torch']:.1e}"))
    return common.markdown_table(HEADER, body)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64],
                   help="decode: sequences per step (default: 1 16 64)")
    p.add_argument("--context", type=int, nargs="+", default=[128, 512, 2048],
                   help="decode: tokens of each sequence, the new one included")
    p.add_argument("--prefill", type=int, nargs="*", default=[128, 512],
                   help="prefill: prompt lengths of one sequence (default: 128 512)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    common.add_timing_args(p, warmup=3, reps=10, min_time=0.3, out=DEFAULT_OUT,
                           quick="smoke test: decode B=2 over 40 tokens, prefill of 24, a few "
                                 "calls")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.context, args.prefill = [2], [40], [24]
        args.warmup, args.reps, args.min_time = 1, 3, 0.0
    if min(args.batch + args.context + (args.prefill or [1])) < 1:
        p.error("--batch, --context and --prefill must be >= 1")
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


def main(argv=None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    cases = [Case("decode", b, c, 1) for b in args.batch for c in args.context]
    cases += [Case("prefill", 1, t, t) for t in args.prefill]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ops_attention_") as tmp, torch.inference_mode():
        from llm_engine.runtime.onnx_backend import OnnxRunner

        model, plan = export_attention(args.heads, args.kv_heads, args.head_dim, Path(tmp))
        runner = OnnxRunner(Path(tmp), plan, args.threads)
        for case in cases:
            rows.append(bench_case(case, runner, args, gen))
    machine = common.machine_info(args.threads)
    overhead = common.ort_overhead_us(args.threads, warmup=args.warmup, reps=args.reps,
                                      min_time=args.min_time)
    ops = common.op_counts(common.runtime_ops(model))
    payload = {
        "benchmark": "ops/attention",
        "command": "python -P benchmarks/ops/attention.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "ort_run_overhead": overhead,
        "config": {k: getattr(args, k) for k in ("batch", "context", "prefill", "heads",
                                                 "kv_heads", "head_dim", "block_size",
                                                 "warmup", "reps", "min_time", "seed",
                                                 "quick")},
        "ort_ops": ops, "ort_nodes": len(model.graph.node),
        "rows": rows,
    }
    common.write_json(args.out, payload)
    print(f"{common.cpu_line(machine, overhead)}\n\n{table(rows)}\n\nONNX ops run per call "
          f"({len(model.graph.node)} nodes): {ops}")
    print(f"wrote {args.out}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
