"""Calibration: run the graph on sample text and observe what quantization needs.

The graph being compiled is run as it is (the plan of the current graph on the torch reference
ops of `kernels/`, with a paged KV cache of its own), not a second copy of the model: what the
observers see is exactly what the engine's GEMMs and attention will see. Each `linear` whose
weight is a weight tensor is wrapped by an observer keyed by the name of its input activation
(linears that read the same activation, such as an unfused q/k/v, share one). Each
`paged_attention` is wrapped to record per-KV-head ranges of K (after rotary embedding) and V.
Each `moe` is wrapped to record, per expert, the rows routed to it and their gated
activations: the inputs of that expert's two GEMMs (`expert_key`).

Statistics are plain tensors (float64 sums, fp32 ranges), saved as safetensors in a cache keyed
by the graph, the weights and the calibration tokens, so a second build of the same model with
another mode skips the calibration run.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm_engine.builder.ir import Graph
from llm_engine.builder.plan import to_plan
from llm_engine.kernels.attention import rope_half
from llm_engine.kernels.dtypes import to_torch_dtype
from llm_engine.kernels.ops import OPS
from llm_engine.runtime.plan import PlanRunner

CALIB_BLOCK = 16
SAMPLE_ROWS = 256  # activation rows kept per linear input, for AWQ's search and error reports


@dataclass
class ActStats:
    """What was seen at one linear input (an activation [rows, K])."""

    absmax: torch.Tensor  # [K] max |x| per channel (SmoothQuant, fp8 scales)
    absmean_sum: torch.Tensor  # [K] sum of |x| per channel (AWQ), float64
    rows: int = 0
    sample: torch.Tensor | None = None  # [<= SAMPLE_ROWS, K] rows spread over the samples
    hessian: torch.Tensor | None = None  # [K, K] sum of x^T x (GPTQ), float64

    @property
    def absmean(self) -> torch.Tensor:
        return (self.absmean_sum / max(self.rows, 1)).float()


@dataclass
class Calibration:
    acts: dict[str, ActStats] = field(default_factory=dict)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> k, v
    tokens: int = 0
    cached: bool = False


def linear_inputs(graph: Graph) -> dict[str, list[str]]:
    """Activation name -> the dense linears with a weight tensor that read it."""
    out: dict[str, list[str]] = {}
    for node in graph.nodes():
        if node.op == "linear" and node.attrs.get("b_format", "dense") == "dense" \
                and graph.producer(node, 1).op == "weight":
            out.setdefault(node.inputs[0], []).append(node.name)
    return out


class GraphRunner:
    """Runs whole sequences through a graph's plan (prefill only, logits for every row)."""

    def __init__(self, graph: Graph, weights: dict[str, torch.Tensor],
                 overrides: dict[str, Callable] | None = None) -> None:
        self.plan = to_plan(graph)
        self.runner = PlanRunner(self.plan, weights, overrides)
        self.layers = self.plan["kv_cache"]["layers"]

    def logits(self, ids: list[int], last_only: bool = False) -> torch.Tensor:
        """Logits of every position ([n, vocab]), or of the last one only (calibration wants
        the activations, not the LM head's 2 * n * hidden * vocab FLOPs)."""
        n = len(ids)
        blocks = math.ceil(n / CALIB_BLOCK)
        caches = []
        for layer in self.layers:
            shape = (blocks, CALIB_BLOCK, layer["num_kv_heads"], layer["head_dim"])
            dtype = to_torch_dtype(layer["dtype"])
            caches.append((torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)))

        class Ctx:
            kv_caches = caches

        feeds = {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.arange(n)[None],
            "slot_mapping": torch.arange(n),
            "block_tables": torch.arange(blocks, dtype=torch.int32)[None],
            "context_lens": torch.tensor([n], dtype=torch.int32),
            "query_start_loc": torch.tensor([0, n], dtype=torch.int32),
            "logits_indices": torch.tensor([n - 1]) if last_only else torch.arange(n),
        }
        with torch.inference_mode():
            return self.runner.run(feeds, Ctx())[0][0].float()


def _observer(stats: ActStats, want_hessian: bool, every: int) -> Callable[[torch.Tensor], None]:
    """Records an activation once per step, however many linears read it."""
    last: list[torch.Tensor | None] = [None]

    def record(x: torch.Tensor) -> None:
        if last[0] is x:
            return
        last[0] = x
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        stats.absmax = torch.maximum(stats.absmax, x2.abs().amax(0))
        stats.absmean_sum += x2.abs().sum(0, dtype=torch.float64)
        stats.rows += x2.shape[0]
        rows = x2[::every]
        stats.sample = rows if stats.sample is None else torch.cat((stats.sample, rows))
        if want_hessian:
            xd = x2.double()
            stats.hessian = (xd.t() @ xd) if stats.hessian is None else \
                stats.hessian.addmm_(xd.t(), xd)

    return record


def _wrap_linear(record: Callable[[torch.Tensor], None], fn: Callable) -> Callable:
    def observed(x, *rest, **attrs):
        record(x)
        return fn(x, *rest, **attrs)

    return observed


def _observe_attention(store: dict, layer: int, fn: Callable) -> Callable:
    def observed(q, k, v, *rest, ctx, **attrs):
        cos_sin = rest[4:6]
        kr = rope_half(k, *cos_sin) if len(cos_sin) == 2 else k
        k_max = kr.detach().float().abs().amax(dim=(0, 2, 3))
        v_max = v.detach().float().abs().amax(dim=(0, 2, 3))
        if layer in store:
            k_max, v_max = torch.maximum(store[layer][0], k_max), \
                torch.maximum(store[layer][1], v_max)
        store[layer] = (k_max, v_max)
        return fn(q, k, v, *rest, ctx=ctx, **attrs)

    return observed


def expert_inputs(graph: Graph) -> dict[str, tuple[int, int, int]]:
    """moe node -> (experts, hidden, intermediate) of each `moe` whose experts are float
    checkpoint weights (what the quantize pass can quantize)."""
    found = {}
    for node in graph.nodes():
        if node.op == "moe" and all(graph.node(i).op == "weight" for i in node.inputs[3:5]) \
                and node.attrs.get("w_format", "dense") == "dense":
            experts, inter2, hidden = graph.node(node.inputs[3]).shape
            found[node.name] = (experts, hidden, inter2 // 2)
    return found


def expert_key(moe: str, expert: int, weight: str) -> str:
    """The `Calibration.acts` key of one expert's GEMM input ("gate_up" or "down")."""
    return f"{moe}/expert{expert}/{weight}"


def _observe_experts(calib: Calibration, name: str, shape: tuple[int, int, int],
                     hessian: bool, every: int) -> Callable:
    """Records, for every expert, the rows routed to it (gate_up's input) and their gated
    activations (down's input): the expert's own calibration data, however few tokens reach
    it."""
    from llm_engine.kernels import moe as moe_ref
    from llm_engine.kernels.ops import _ACTS

    experts, hidden, inter = shape
    records = []
    for e in range(experts):
        pair = []
        for weight, K in (("gate_up", hidden), ("down", inter)):
            stats = ActStats(torch.zeros(K), torch.zeros(K, dtype=torch.float64))
            calib.acts[expert_key(name, e, weight)] = stats
            pair.append(_observer(stats, hessian, every))
        records.append(pair)

    def observed(x, index, weights, gate_up, down, *biases, **attrs):
        flat = x.reshape(-1, x.shape[-1])
        idx = index.reshape(flat.shape[0], -1)
        for e in torch.unique(idx).tolist():
            rows = flat[(idx == e).any(dim=1)]
            records[e][0](rows)
            h = rows @ gate_up[e].t().to(rows.dtype)
            if biases:
                h = h + biases[0][e].to(rows.dtype)
            records[e][1](moe_ref.gate(h, act=attrs["act"], acts=_ACTS,
                                       alpha=attrs.get("alpha", 0.0),
                                       limit=attrs.get("limit", 0.0)))
        return OPS["moe"].fn(x, index, weights, gate_up, down, *biases, **attrs)

    return observed


def calibrate(graph: Graph, weights: dict[str, torch.Tensor], samples: list[list[int]], *,
              hessian: bool, progress: Callable[[str], None] | None = None) -> Calibration:
    """Run every sample through the graph with observers on; return what they saw."""
    calib = Calibration()
    total_rows = sum(len(s) for s in samples)
    every = max(1, total_rows // SAMPLE_ROWS)
    overrides: dict[str, Callable] = {}
    for act, linears in linear_inputs(graph).items():
        K = graph.weights[graph.producer(graph.node(linears[0]), 1).attrs["name"]].shape[1]
        stats = ActStats(torch.zeros(K), torch.zeros(K, dtype=torch.float64))
        calib.acts[act] = stats
        record = _observer(stats, hessian, every)
        for name in linears:
            overrides[name] = _wrap_linear(record, OPS["linear"].fn)
    for name, shape in expert_inputs(graph).items():
        overrides[name] = _observe_experts(calib, name, shape, hessian, every)
    for node in graph.nodes():
        if node.op == "paged_attention":
            overrides[node.name] = _observe_attention(calib.kv, node.attrs["layer"],
                                                      OPS["paged_attention"].fn)
    runner = GraphRunner(graph, weights, overrides)
    for i, ids in enumerate(samples):
        runner.logits(ids, last_only=True)
        calib.tokens += len(ids)
        if progress:
            progress(f"sample {i + 1}/{len(samples)}")
    for stats in calib.acts.values():
        if stats.sample is not None:
            stats.sample = stats.sample[:SAMPLE_ROWS].contiguous()
    return calib


# ---- cache -------------------------------------------------------------------------------


def cache_key(graph: Graph, weight_digest: str, samples: list[list[int]], hessian: bool) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(linear_inputs(graph).items())).encode())
    h.update(json.dumps(sorted(expert_inputs(graph).items())).encode())
    h.update(json.dumps(graph.meta.get("kv_cache"), sort_keys=True).encode())
    h.update(weight_digest.encode())
    h.update(json.dumps(samples).encode())
    h.update(f"hessian={hessian};rows={SAMPLE_ROWS}".encode())
    return h.hexdigest()[:32]


def save(calib: Calibration, path: Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = {"tokens": str(calib.tokens), "acts": json.dumps(sorted(calib.acts))}
    for i, name in enumerate(sorted(calib.acts)):
        s = calib.acts[name]
        tensors[f"a{i}.absmax"] = s.absmax
        tensors[f"a{i}.absmean_sum"] = s.absmean_sum
        tensors[f"a{i}.rows"] = torch.tensor([s.rows])
        if s.sample is not None:
            tensors[f"a{i}.sample"] = s.sample
        if s.hessian is not None:
            tensors[f"a{i}.hessian"] = s.hessian
    for layer, (k, v) in calib.kv.items():
        tensors[f"kv{layer}.k"] = k
        tensors[f"kv{layer}.v"] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load(path: Path) -> Calibration | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (OSError, ValueError, RuntimeError):  # a missing, partial or foreign file: recompute
        return None
    calib = Calibration(tokens=int(meta["tokens"]), cached=True)
    for i, name in enumerate(json.loads(meta["acts"])):
        calib.acts[name] = ActStats(t[f"a{i}.absmax"], t[f"a{i}.absmean_sum"],
                                    int(t[f"a{i}.rows"][0]), t.get(f"a{i}.sample"),
                                    t.get(f"a{i}.hessian"))
    for key in t:
        if key.startswith("kv") and key.endswith(".k"):
            layer = int(key[2:-2])
            calib.kv[layer] = (t[key], t[f"kv{layer}.v"])
    return calib


def weight_digest(weights: dict[str, torch.Tensor], names: Iterable[str]) -> str:
    """A cheap fingerprint of the weights: shapes plus a strided sample of every tensor."""
    h = hashlib.sha256()
    for name in sorted(names):
        w = weights[name]
        flat = w.reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(flat[::step].float().numpy().tobytes())
    return h.hexdigest()
