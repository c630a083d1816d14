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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ONNX_FILE = "model.onnx"
KV_OUTPUT = "kv_new"
NEG = -1e30
# The graph's inputs and outputs as this runtime binds them (builder/onnx_export's docstring);
# engine.json's `cpu_graph` records it. 2: one cache input per layer and K/V half.
GRAPH_CONTRACT = 2

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
    if graph.get("contract") != GRAPH_CONTRACT:
        return ("the engine's ONNX graph is from an older builder (rebuild the engine to run "
                "it on the CPU fast path)")
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
                       windows: list[int], pad_to: int = 1, rel_pos: bool = False
                       ) -> dict[str, np.ndarray]:
    """Per-step inputs shared by every attention layer: the flat token batch laid out as
    [sequences, longest chunk] query rows against [earlier context + this chunk] keys.

    numpy, once per step (not per layer or per sequence), and few operations: after the model
    has streamed its weights through the caches, each one costs several microseconds. With
    `rel_pos` (ALiBi graphs) each key's position minus each query's, laid out as the mask,
    goes with it. The context width is rounded up to `pad_to` (masked columns), so in decode the shapes, and so
    the runtime's bound buffers, change once per `pad_to` steps rather than every step."""
    starts = feeds["query_start_loc"].numpy().astype(np.int64, copy=False)
    lens = feeds["context_lens"].numpy().astype(np.int64, copy=False)
    n_q = starts[1:] - starts[:-1]
    past = lens - n_q
    b, t = lens.size, int(starts[-1])
    tq = int(n_q.max())
    c = -(-max(int(past.max()), 1) // pad_to) * pad_to  # >= 1 column keeps shapes non-empty
    ar_c = np.arange(c)
    # Context slots block by block; columns past a sequence's context read some slot of the
    # cache (block 0 where the table is padded) and are masked.
    tables = feeds["block_tables"].numpy()
    blocks = -(-c // block_size)
    if blocks > tables.shape[1]:
        tables = np.pad(tables, ((0, 0), (0, blocks - tables.shape[1])))
    ctx_slots = (tables[:, :blocks, None].astype(np.int64) * block_size
                 + np.arange(block_size)).reshape(b, -1)[:, :c]
    mask = np.zeros((b, 1, tq, c + tq), np.float32)
    mask[:, 0, :, :c] = np.where(ar_c >= past[:, None], np.float32(NEG), np.float32(0))[:, None]
    if tq == 1:  # decode: one row per sequence, in order, attending to its own new key
        q_index = starts[:-1, None]
        out_index = np.arange(t)
    else:
        ar_q = np.arange(tq)
        first = starts[:-1]
        q_index = first[:, None] + np.minimum(ar_q[None], np.maximum(n_q - 1, 0)[:, None])
        seq = np.repeat(np.arange(b), n_q)
        out_index = seq * tq + (np.arange(t) - first[seq])
        own = (ar_q[None, :] <= ar_q[:, None])[None] & (ar_q[None, None, :] < n_q[:, None, None])
        mask[:, 0, :, c:][~own] = NEG
    out = {"attn.q_index": q_index, "attn.ctx_slots": ctx_slots, "attn.out_index": out_index,
           "attn.mask": mask}
    if windows or rel_pos:
        q_pos = past[:, None] + np.arange(tq)[None]  # [B, Tq]
        k_pos = np.concatenate([np.broadcast_to(ar_c[None], (b, c)), q_pos], axis=1)
    if rel_pos:
        out["attn.rel_pos"] = (k_pos[:, None, None, :] - q_pos[:, None, :, None]
                               ).astype(np.float32)
    if windows:
        near = k_pos[:, None, :] > q_pos[:, :, None] - np.asarray(windows)[:, None, None, None]
        for w, allowed in zip(windows, near):
            out[f"attn.mask.w{w}"] = np.where(allowed[:, None], mask, NEG).astype(np.float32)
    return out


class OnnxRunner:
    """Same call as runtime.plan.PlanRunner: run(feeds, cache) -> [logits]. The logits tensor
    is the runner's own output buffer, valid until the next run (as a CUDA graph's static
    outputs are): the engine samples from it within the step; copy what must outlive it."""

    def __init__(self, engine_dir: Path, plan: dict[str, Any], threads: int,
                 spinning: bool | None = None) -> None:
        """`spinning`: None follows LLM_ENGINE_ORT_SPIN (default on)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning keeps the pool's threads awake between kernels of one step; without it
        # each of a step's ~2000 kernels pays a wake-up.
        if spinning is None:
            spinning = os.environ.get("LLM_ENGINE_ORT_SPIN", "1") != "0"
        # What this machine got, for the `KV cache:` line and /metrics (onnxruntime picks its
        # MLAS kernels by CPUID at load: the graph names no ISA).
        self.settings = {"onnxruntime": ort.__version__, "threads": str(threads),
                         "spinning": "on" if spinning else "off"}
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        opts.log_severity_level = 3
        for entry in filter(None, os.environ.get("LLM_ENGINE_ORT_CONFIG", "").split(",")):
            key, _, value = entry.partition("=")
            opts.add_session_config_entry(key, value)
        # onnxruntime's per-node profile (benchmarks/ops/step_profile.py reads it): each
        # kernel's time, written to PREFIX_<date>.json when the session ends its profiling.
        profile = os.environ.get("LLM_ENGINE_ORT_PROFILE")
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile
        try:
            self.session = ort.InferenceSession(str(engine_dir / ONNX_FILE), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types; the graph is untrusted input
            from llm_engine.runtime.engine_dir import EngineLoadError

            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise EngineLoadError(f"onnxruntime refused {ONNX_FILE} ({first}); rebuild the "
                                  "engine or use --kernels reference") from e
        names = [i.name for i in self.session.get_inputs()]
        self.inputs = [n for n in names if not n.startswith(("attn.", "kv_cache."))]
        self._io, self._io_key = None, None
        self._buffers: dict[str, Any] = {}  # bound by address, reused while shapes hold
        self._rows: np.ndarray | None = None  # the cache's rows, set with the binding
        # Time inside onnxruntime, so a benchmark can tell the model's time from the host's.
        self.session_seconds, self.steps = 0.0, 0
        self.windows = sorted(int(n.rsplit(".w", 1)[1]) for n in names
                              if n.startswith("attn.mask.w"))
        self.rel_pos = "attn.rel_pos" in names  # an ALiBi model's graph
        out_node = next(n for n in plan["nodes"] if n["name"] == plan["outputs"][0])
        self.vocab = int(out_node["shape"][-1])

    def _bind(self, io, name: str, t: torch.Tensor, output: bool = False) -> None:
        t = t if t.is_contiguous() else t.contiguous()
        dtype = _ELEM.get(t.dtype)
        if dtype is None:
            raise TypeError(f"onnx backend: no ONNX element type for {t.dtype} ({name})")
        bind = io.bind_output if output else io.bind_input
        bind(name, "cpu", 0, dtype, list(t.shape), t.data_ptr())

    def _binding(self, stacked: torch.Tensor):
        """The session's IO binding with every layer's cache halves bound, and the cache as
        numpy rows [layers * 2, slots, kv_heads * head_dim] for the K/V store (both once per
        cache tensor: it stays at the same address for the engine's life)."""
        key = (stacked.data_ptr(), tuple(stacked.shape), stacked.dtype)
        if self._io_key != key:
            io = self.session.io_binding()
            layers, _, num_blocks, block_size, kvh, d = stacked.shape
            halves = stacked.view(layers, 2, num_blocks * block_size, kvh * d)
            for layer in range(layers):
                for i, half in enumerate("kv"):
                    self._bind(io, f"kv_cache.{layer}.{half}", halves[layer, i])
            self._io, self._io_key, self._buffers = io, key, {}
            self._rows = _as_numpy(halves).reshape(layers * 2, num_blocks * block_size, kvh * d)
        return self._io

    def _put(self, io, name: str, values: np.ndarray) -> None:
        """Copy a step's values into the buffer bound to input `name`; a new shape gets a new
        buffer, bound once (steady decode rebinds nothing but the logits)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != values.shape or buf.dtype != values.dtype:
            buf = np.empty(values.shape, values.dtype)
            self._buffers[name] = buf
            io.bind_input(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        np.copyto(buf, values)

    def _output(self, io, name: str, shape: tuple[int, ...], dtype: torch.dtype
                ) -> torch.Tensor:
        """The buffer bound to output `name`, reused while its shape holds."""
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype)
            self._buffers[name] = buf
            self._bind(io, name, buf, output=True)
        return buf

    def run(self, feeds: dict[str, torch.Tensor], cache: Any) -> list[torch.Tensor]:
        stacked = cache.stacked
        if stacked is None:
            raise RuntimeError("onnx backend needs one stacked KV cache tensor")
        layers, _, _, block_size, kvh, d = stacked.shape
        io = self._binding(stacked)
        for name in self.inputs:
            self._put(io, name, feeds[name].numpy())
        for name, arr in attention_metadata(feeds, block_size, self.windows,
                                            pad_to=block_size, rel_pos=self.rel_pos).items():
            self._put(io, name, arr)
        n_rows = feeds["logits_indices"].numel()
        slots = feeds["slot_mapping"]
        logits = self._output(io, "logits", (1, n_rows, self.vocab), torch.float32)
        kv_new = self._output(io, KV_OUTPUT, (layers, 2, slots.numel(), kvh, d), stacked.dtype)
        start = time.perf_counter()
        self.session.run_with_iobinding(io)
        self.session_seconds += time.perf_counter() - start
        self.steps += 1
        # numpy's indexed store: torch's costs ~10x more on the cache's huge strided view
        self._rows[:, slots.numpy()] = _as_numpy(kv_new).reshape(layers * 2, -1, kvh * d)
        return [logits]


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of t; dtypes numpy lacks (bf16, fp8) as integers of their width, which
    is all a copy of their bits needs."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    elif t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    return t.numpy()
