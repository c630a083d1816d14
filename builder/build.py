"""`engine build`: the compiler driver. Reads like a table of contents: open and trace the
model, run PASSES over it, write the engine directory."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from llm_engine.builder.codegen import codegen
from llm_engine.builder.errors import BuildError
from llm_engine.builder.frontend import open_model, trace_model
from llm_engine.builder.frontend.checkpoint_names import checkpoint_weights
from llm_engine.builder.frontend.trace import Traced
from llm_engine.builder.ir import Graph
from llm_engine.builder.onnx_export_report import OnnxExport
from llm_engine.builder.passes.fold_weights import fold_weights
from llm_engine.builder.passes.fuse import RULES as FUSE_RULES
from llm_engine.builder.passes.fuse import fuse
from llm_engine.builder.passes.kv_cache import kv_cache, select_logits
from llm_engine.builder.passes.lower_aten import lower_aten
from llm_engine.builder.passes.partition import partition
from llm_engine.builder.passes.plan_memory import plan_memory
from llm_engine.builder.passes.quantize import quantize
from llm_engine.builder.passes.report import PassReport
from llm_engine.builder.plan import to_plan
from llm_engine.builder.quant.config import QuantConfig
from llm_engine.builder.verify import VerifyError, verify
from llm_engine.builder.weights import make_weight
from llm_engine.builder.writer import (
    EngineWriter,
    engine_manifest,
    engine_report,
    write_safetensors_streaming,
)
from llm_engine.runtime.onnx_backend import GRAPH_CONTRACT, ONNX_FILE, plan_digest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The pass list is data: (name, pass, can the user disable it?). Every pass is a function
# (graph, options) -> (graph, PassReport); lower_aten's graph is torch.export's, the others'
# the IR. `partition` splits the model into ranks: the passes after it run once per rank.
PASSES: list[tuple[str, Callable[[Any, PassOptions], tuple[Graph, PassReport]], bool]] = [
    ("lower_aten", lower_aten, False),
    ("fold_weights", fold_weights, False),
    ("kv_cache", kv_cache, False),
    ("select_logits", select_logits, False),
    ("fuse", fuse, True),
    ("quantize", quantize, True),
    ("partition", partition, False),
    ("plan_memory", plan_memory, True),
    ("codegen", codegen, True),
]


def _cache_root() -> Path:
    import os

    return Path(os.environ.get("LLM_ENGINE_CACHE") or Path.home() / ".cache" / "llm-engine")


@dataclass
class BuildOptions:
    model: str
    output: Path
    dtype: str = "float32"
    max_seq_len: int | None = None
    max_batch_tokens: int = 2048
    disabled_passes: tuple[str, ...] = ()
    force: bool = False
    device: str = "cpu"
    quant: str | None = None
    quant_exclude: tuple[str, ...] = ()
    group_size: int | None = None  # None: 128, falling back silently where it does not fit
    kv_cache_dtype: str | None = None
    smoothquant_alpha: float | str = 0.5
    rotation: str = "auto"  # none | offline | online | auto (builder.quant.rotate)
    fp8_act_scales: str = "static"  # static | per-token | per-token-group (fp8 only)
    int4_zero_point: str = "float"  # float | integer (int4 modes only)
    calib_data: Path | None = None
    calib_samples: int = 8
    calib_seq_len: int = 512
    calib_cache: Path | None = field(default_factory=lambda: _cache_root() / "calib")
    max_ppl_increase: float | None = None
    min_greedy_agreement: float | None = None
    tp: int = 1
    pp: int = 1
    # the --quant family, typed and checked once here; the quantize pass reads only this
    quant_config: QuantConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        self.quant_config = QuantConfig.from_options(self)
        if self.dtype not in DTYPES:
            raise BuildError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.max_batch_tokens < 1:
            raise BuildError("--max-batch-tokens must be at least 1")
        if self.device not in ("cpu", "cuda"):
            raise BuildError(f"--device {self.device!r} is not one of cpu, cuda")
        for flag, value in (("--tp", self.tp), ("--pp", self.pp)):
            if not isinstance(value, int) or value < 1:
                raise BuildError(f"{flag} must be a positive integer, got {value!r}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise BuildError("--max-seq-len must be at least 1")
        valid = {name for name, _, optional in PASSES if optional}
        valid |= {f"fuse.{r.name}" for r in FUSE_RULES}
        for name in self.disabled_passes:
            if name in {n for n, _, optional in PASSES if not optional}:
                raise BuildError(f"pass {name} is required by the runtime and cannot be disabled")
            if name not in valid:
                raise BuildError(f"unknown pass {name!r}; passes: {', '.join(sorted(valid))}")


class BuildUI:
    """Progress hooks; the default is silent (tests, library use)."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield

    def counter(self, name: str, total: int) -> Callable[[str], None]:
        return lambda item: None

    def note(self, text: str) -> None:
        pass


@dataclass
class PassOptions(BuildOptions):
    """What every pass gets as `options`: the build's options, max_seq_len resolved against
    the model, plus what opening and tracing the model gave, for the passes that read the
    checkpoint (lower_aten, quantize). None of these extras is written to engine.json."""

    weights: Any = None  # the checkpoint's tensors by name, read lazily
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # traced; + computed weights
    tokenizer: Callable[[], Any] | None = None  # loads the model's tokenizer, or None
    vocab_size: int = 0
    ui: BuildUI = field(default_factory=BuildUI)  # the build's progress display

    @classmethod
    def of(cls, options: BuildOptions, source, traced: Traced, max_seq_len: int,
           ui: BuildUI | None = None) -> PassOptions:
        build = {f.name: getattr(options, f.name) for f in fields(BuildOptions) if f.init}
        return cls(**{**build, "max_seq_len": max_seq_len}, weights=source.weights,
                   buffers=traced.buffers,
                   tokenizer=source.load_tokenizer if source.has_tokenizer() else None,
                   vocab_size=int(source.config.vocab_size), ui=ui or BuildUI())


def run_passes(graph: Any, options: PassOptions) -> tuple[list[Graph], list[PassReport]]:
    """Run PASSES in order over `graph` (torch.export's, as lower_aten takes it), verifying
    the graph after each; returns the rank graphs (one unless --tp/--pp) and the reports (for
    passes after the partition, rank 0's). A pass that splits the model hands back its ranks
    in graph.meta["ranks"]; every pass after it runs once per rank."""
    graphs, reports = [graph], []
    for name, fn, _ in PASSES:
        if name in options.disabled_passes:
            reports.append(PassReport(name, notes=["disabled by --disable-pass"]))
            continue
        with options.ui.stage(f"pass {name}"):
            start = time.perf_counter()
            results = [fn(g, options) for g in graphs]
            graphs = [rank for g, _ in results for rank in g.meta.pop("ranks", [g])]
            report = results[0][1]
            for rank, g in enumerate(graphs):
                try:
                    verify(g)
                except VerifyError as e:
                    where = f" (rank {rank})" if len(graphs) > 1 else ""
                    raise BuildError(f"pass {name} produced an invalid graph{where}: {e}") \
                        from e
            report.seconds = round(time.perf_counter() - start, 3)
            report.op_counts_after = graphs[0].op_counts()
            options.ui.note(report.summary())
        reports.append(report)
    return graphs, reports


def build_engine(options: BuildOptions, ui: BuildUI | None = None) -> Path:
    """Open and trace the model, run PASSES over it, write the engine directory (atomically:
    nothing is left behind on failure); returns the engine's path."""
    ui = ui or BuildUI()
    timings = _Timings()
    EngineWriter(options.output, options.force)  # refuses an existing output before slow work
    with timings("open_model"), ui.stage("open model"):
        source = open_model(options.model)
        max_seq_len = _resolve_max_seq_len(source.config, options.max_seq_len)
    with timings("trace"), ui.stage("trace (torch.export)"):
        traced = trace_model(source.config, DTYPES[options.dtype])
        source.weights = checkpoint_weights(source.weights, traced)
    with timings("passes"):
        graphs, reports = run_passes(traced, PassOptions.of(options, source, traced,
                                                            max_seq_len, ui))

    with EngineWriter(options.output, options.force) as out:
        with timings("write_weights"):
            weight_bytes = _write_ranks(out, graphs, source, traced, ui)
        with timings("onnx"):
            onnx, cpu_graph = _write_onnx(out, graphs, options, ui)
        with timings("moe_report"):
            moe = _moe_report(out, graphs, options, source, ui)
        with timings("tokenizer"):
            _write_tokenizer(out, source, ui)
        _write_kernels(out, graphs)
        report = engine_report(traced, graphs, reports, onnx=onnx, weight_bytes=weight_bytes,
                               timings=timings)
        out.write_json("report.json", {**report, **({"moe": moe} if moe else {})})
        out.write_json("engine.json", engine_manifest(out, options, source, traced, graphs,
                                                      max_seq_len=max_seq_len,
                                                      cpu_graph=cpu_graph))
    return options.output


class _Timings(dict[str, float]):
    """Seconds per build stage (report.json -> timings_s)."""

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self[stage] = round(time.perf_counter() - start, 3)


def _resolve_max_seq_len(config, requested: int | None) -> int:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) \
        or getattr(config, "max_seq_len", None)  # MPT's
    if requested is None:
        return int(limit or 4096)
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk and "chunked_attention" in (getattr(config, "layer_types", None) or ()):
        # Llama 4: within one chunk its chunked layers are causal, which is what the engine
        # computes; past it they would attend across chunks.
        if requested is None:
            return int(min(limit or 4096, chunk))
        if requested > chunk:
            raise BuildError(f"--max-seq-len {requested} exceeds the model's attention chunk "
                             f"({chunk} tokens): chunked attention is not supported yet; pass "
                             f"--max-seq-len {chunk} or less")
    learned = getattr(config, "model_type", "") in ("gpt2",)
    if learned and limit and requested > limit:
        raise BuildError(f"--max-seq-len {requested} exceeds the model's {limit} learned "
                         "positions; pass at most that")
    return requested


# ---- writing the engine directory ------------------------------------------------------------
def _write_ranks(out: EngineWriter, graphs: list[Graph], source, traced: Traced,
                 ui: BuildUI) -> dict[str, int]:
    """Each rank's weights file and plan; returns the weight bytes by dtype."""
    weight_bytes: dict[str, int] = {}
    for rank, graph in enumerate(graphs):
        label = f"write weights (rank {rank})" if len(graphs) > 1 else "write weights"
        with ui.stage(label):
            _write_rank_weights(out.path(f"weights.rank{rank}.safetensors"), graph, source,
                                traced.buffers, weight_bytes, ui)
        out.write_json(f"plan.rank{rank}.json", to_plan(graph))
    return weight_bytes


def _write_rank_weights(path: Path, graph: Graph, source, buffers, weight_bytes: dict[str, int],
                        ui: BuildUI) -> None:
    specs = [(name, spec.shape, spec.dtype) for name, spec in sorted(graph.weights.items())]
    tick = ui.counter("weights", len(specs))

    def stream():
        for name, _, _ in specs:
            tensor = make_weight(graph.weights[name], source.weights, buffers)
            key = str(tensor.dtype).removeprefix("torch.")
            weight_bytes[key] = weight_bytes.get(key, 0) + tensor.numel() * tensor.element_size()
            yield name, tensor

    write_safetensors_streaming(path, specs, stream(), on_tensor=tick)


def _write_onnx(out: EngineWriter, graphs: list[Graph], options: BuildOptions, ui: BuildUI
                ) -> tuple[OnnxExport | None, dict[str, Any] | None]:
    """The CPU fast path's graph for a single-rank CPU engine, from the plan as written (needs
    the `onnx` package, in the cpu and gpu extras; without it the engine runs on the reference
    executor). Returns report.json's `onnx` and engine.json's `cpu_graph`."""
    if len(graphs) > 1 or options.device != "cpu":
        return None, None
    with ui.stage("onnx graph (CPU fast path)"):
        plan = json.loads(out.path("plan.rank0.json").read_text())
        if importlib.util.find_spec("onnx") is None:
            export = OnnxExport(False, "the onnx package is not installed (pip install onnx)")
        else:
            from llm_engine.builder.onnx_export import export_onnx

            export = export_onnx(plan, out.path("weights.rank0.safetensors"),
                                 out.path(ONNX_FILE))
            if export.written and importlib.util.find_spec("onnxruntime") is not None:
                export = _checked(out, plan, options, export)
        if export.written:
            return export, {"file": ONNX_FILE, "plan_sha256": plan_digest(plan),
                            "contract": GRAPH_CONTRACT}
        ui.note(f"no ONNX graph: {export.reason}; the CPU runtime will use the reference "
                "executor")
        return export, None


def _moe_report(out: EngineWriter, graphs: list[Graph], options: BuildOptions, source,
                ui: BuildUI) -> dict[str, Any] | None:
    """report.json's `moe` (builder/moe_report.py): rank 0's experts, and the routing
    balance on a few windows of the calibration text (single-rank engines)."""
    from llm_engine.builder.moe_report import WINDOW_TOKENS, WINDOWS, moe_report
    from llm_engine.builder.quant.calib_data import load_calib_data

    def windows() -> list[list[int]]:
        if len(graphs) > 1:
            raise BuildError("measured on single-rank builds")
        tokenizer = source.load_tokenizer() if source.has_tokenizer() else None
        return load_calib_data(options.calib_data, tokenizer, samples=WINDOWS,
                               seq_len=WINDOW_TOKENS, heldout=0,
                               vocab_size=int(source.config.vocab_size)).samples

    return moe_report(graphs[0], out.path("weights.rank0.safetensors"), windows, ui)


def _checked(out: EngineWriter, plan: dict[str, Any], options: BuildOptions,
             export: OnnxExport) -> OnnxExport:
    """The export, or, when onnxruntime refuses the graph or it disagrees with the plan's
    reference executor on a test step, no graph and the reason (builder/onnx_check.py)."""
    from llm_engine.builder.onnx_check import check_graph

    out_node = next(n for n in plan["nodes"] if n["name"] == plan["outputs"][0])
    quantized = bool(options.quant) or options.kv_cache_dtype not in (None, "auto")
    kind = "quantized" if quantized else "float32" if options.dtype == "float32" else "half"
    why = check_graph(out.path(ONNX_FILE).parent, plan, kind, vocab=int(out_node["shape"][-1]))
    if why is None:
        return export
    out.path(ONNX_FILE).unlink()
    return OnnxExport(False, f"graph checked and left out: {why}")


def _write_tokenizer(out: EngineWriter, source, ui: BuildUI) -> None:
    if not source.has_tokenizer():
        ui.note("no tokenizer in the checkpoint: the engine takes token ids only")
        return
    with ui.stage("tokenizer"):
        source.load_tokenizer().save_pretrained(str(out.path("tokenizer")))
        if not out.path("tokenizer/tokenizer.json").is_file():
            raise BuildError("the model's tokenizer has no fast (tokenizer.json) form; "
                             "the runtime needs one")


def _write_kernels(out: EngineWriter, graphs: list[Graph]) -> None:
    sources: dict[str, str] = {}
    for g in graphs:  # kernels are named by their hash: ranks share identical ones
        sources.update(g.meta.get("codegen", {}).get("sources", {}))
    for name, text in sorted(sources.items()):
        out.path(f"kernels/{name}.py").write_text(text)
