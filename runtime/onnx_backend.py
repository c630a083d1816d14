"""The CPU fast path: run a step through the engine's ONNX graph with onnxruntime.

The builder writes `model.onnx` (see builder/onnx_export.py for the contract): the whole step
in one graph, attention included, reading the paged KV cache in place. Per step this module
builds the attention metadata every layer shares (padded query rows, context slots, an
additive mask), binds the cache and the output buffers by address (no copies), runs the
session once, and writes the step's keys and values into the cache with one indexed store.

Only onnxruntime is imported here (not onnx): the runtime reads what the builder wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

ONNX_FILE = "model.onnx"
KV_OUTPUT = "kv_new"
NEG = -1e30

# torch dtype -> the element type io_binding takes: a numpy type, or the ONNX type number
# where numpy has none (TensorProto.BFLOAT16 = 16, FLOAT8E4M3FN = 17).
_ELEM: dict[torch.dtype, Any] = {
    torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
    torch.int32: np.int32, torch.int8: np.int8, torch.uint8: np.uint8, torch.bfloat16: 16,
    torch.float8_e4m3fn: 17}


def plan_digest(plan: dict[str, Any]) -> str:
    """What engine.json's `cpu_graph` records, so a graph is never run for another plan."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def available(engine_dir: Path, meta: dict[str, Any], plan: dict[str, Any]) -> str | None:
    """None when the fast path can run this engine, else why not."""
    graph = meta.get("cpu_graph")
    if not isinstance(graph, dict) or graph.get("file") != ONNX_FILE or \
            not (engine_dir / ONNX_FILE).is_file():
        return "the engine has no ONNX graph (report.json 'onnx' says why)"
    if graph.get("plan_sha256") != plan_digest(plan):
        return "the engine's ONNX graph was built for another plan"
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime)"
    if _version(onnxruntime.__version__) < MIN_ORT:
        # Older loaders follow an external-data location out of the model's directory, and
        # the graph comes from the (untrusted) engine directory.
        return (f"onnxruntime {onnxruntime.__version__} reads external data from outside the "
                "model directory; pip install -U 'onnxruntime>=1.24.1'")
    return None


MIN_ORT = (1, 24, 1)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def attention_metadata(feeds: dict[str, torch.Tensor], block_size: int,
                       windows: list[int]) -> dict[str, torch.Tensor]:
    """Per-step inputs shared by every attention layer: the flat token batch laid out as
    [sequences, longest chunk] query rows against [earlier context + this chunk] keys."""
    starts = feeds["query_start_loc"].long()
    lens = feeds["context_lens"].long()
    n_q = starts[1:] - starts[:-1]
    past = lens - n_q
    b = lens.numel()
    tq = int(n_q.max())
    c = max(int(past.max()), 1)  # one masked column keeps the shapes non-empty
    ar_q, ar_c = torch.arange(tq), torch.arange(c)
    first = starts[:-1]
    q_index = first[:, None] + torch.minimum(ar_q[None], (n_q - 1).clamp(min=0)[:, None])
    seq = torch.repeat_interleave(torch.arange(b), n_q)
    t = int(starts[-1])
    out_index = seq * tq + (torch.arange(t) - first[seq])
    tables = feeds["block_tables"].long()
    blk = (ar_c // block_size).clamp(max=tables.shape[1] - 1)
    slots = tables[:, blk] * block_size + ar_c % block_size
    in_past = ar_c[None] < past[:, None]
    ctx_slots = torch.where(in_past, slots, torch.zeros_like(slots))
    q_pos = past[:, None] + ar_q[None]  # [B, Tq]
    k_pos = torch.cat([ar_c[None].expand(b, c), q_pos], dim=1)  # [B, C + Tq]
    valid = torch.cat([in_past, ar_q[None] < n_q[:, None]], dim=1)
    causal = valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, Tq, C+Tq]
    out = {"attn.q_index": q_index, "attn.ctx_slots": ctx_slots, "attn.out_index": out_index}

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(allowed, zero, torch.full((), NEG))[:, None]

    out["attn.mask"] = additive(causal)
    for w in windows:
        out[f"attn.mask.w{w}"] = additive(causal & (k_pos[:, None, :] > q_pos[:, :, None] - w))
    return out


class OnnxRunner:
    """Same call as runtime.plan.PlanRunner: run(feeds, cache) -> [logits]."""

    def __init__(self, engine_dir: Path, plan: dict[str, Any], threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning keeps the pool's threads awake between kernels of one step; without it
        # each of a step's ~2000 kernels pays a wake-up.
        spinning = os.environ.get("LLM_ENGINE_ORT_SPIN", "1") != "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        opts.log_severity_level = 3
        for entry in filter(None, os.environ.get("LLM_ENGINE_ORT_CONFIG", "").split(",")):
            key, _, value = entry.partition("=")
            opts.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(engine_dir / ONNX_FILE), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types; the graph is untrusted input
            from llm_engine.runtime.engine_dir import EngineLoadError

            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise EngineLoadError(f"onnxruntime refused {ONNX_FILE} ({first}); rebuild the "
                                  "engine or use --kernels reference") from e
        names = [i.name for i in self.session.get_inputs()]
        self.inputs = [n for n in names if not n.startswith("attn.") and n != "kv_cache"]
        self.windows = sorted(int(n.rsplit(".w", 1)[1]) for n in names
                              if n.startswith("attn.mask.w"))
        out_node = next(n for n in plan["nodes"] if n["name"] == plan["outputs"][0])
        self.vocab = int(out_node["shape"][-1])

    def _bind(self, io, name: str, t: torch.Tensor, output: bool = False) -> None:
        t = t if t.is_contiguous() else t.contiguous()
        dtype = _ELEM.get(t.dtype)
        if dtype is None:
            raise TypeError(f"onnx backend: no ONNX element type for {t.dtype} ({name})")
        bind = io.bind_output if output else io.bind_input
        bind(name, "cpu", 0, dtype, list(t.shape), t.data_ptr())

    def run(self, feeds: dict[str, torch.Tensor], cache: Any) -> list[torch.Tensor]:
        stacked = cache.stacked
        if stacked is None:
            raise RuntimeError("onnx backend needs one stacked KV cache tensor")
        layers, _, num_blocks, block_size, kvh, d = stacked.shape
        per_half = num_blocks * block_size
        meta = attention_metadata(feeds, block_size, self.windows)
        io = self.session.io_binding()
        keep = []  # tensors bound by address must outlive the run
        for name in self.inputs:
            keep.append(feeds[name].contiguous())
            self._bind(io, name, keep[-1])
        for name, t in meta.items():
            keep.append(t.contiguous())
            self._bind(io, name, keep[-1])
        stride = torch.tensor([per_half], dtype=torch.int64)
        self._bind(io, "attn.layer_stride", stride)
        self._bind(io, "kv_cache", stacked.view(2 * layers * per_half, kvh, d))
        n_rows = feeds["logits_indices"].numel()
        n_tok = feeds["slot_mapping"].numel()
        logits = torch.empty(1, n_rows, self.vocab, dtype=torch.float32)
        kv_new = torch.empty(layers, 2, n_tok, kvh, d, dtype=stacked.dtype)
        self._bind(io, "logits", logits, output=True)
        self._bind(io, KV_OUTPUT, kv_new, output=True)
        self.session.run_with_iobinding(io)
        stacked.view(layers, 2, per_half, kvh, d)[:, :, feeds["slot_mapping"]] = kv_new
        return [logits]
