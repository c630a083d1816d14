"""`engine build`: the compiler driver. Reads like a table of contents."""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llm_engine.builder.codegen import codegen
from llm_engine.builder.errors import BuildError
from llm_engine.builder.frontend import open_model, trace_model
from llm_engine.builder.ir import Graph
from llm_engine.builder.onnx_export_report import OnnxExport
from llm_engine.builder.passes.fuse import RULES as FUSE_RULES
from llm_engine.builder.passes.fuse import fuse
from llm_engine.builder.passes.kv_cache import kv_cache, select_logits
from llm_engine.builder.passes.lower_aten import lower_aten
from llm_engine.builder.passes.partition import partition_tp
from llm_engine.builder.passes.pipeline import partition_pp, partition_tp_pp
from llm_engine.builder.passes.plan_memory import plan_memory
from llm_engine.builder.passes.quantize import QuantEnv, check_options, quantize
from llm_engine.builder.passes.report import PassReport
from llm_engine.builder.plan import to_plan
from llm_engine.builder.verify import VerifyError, verify
from llm_engine.builder.weights import make_weight
from llm_engine.builder.writer import EngineWriter, write_safetensors_streaming
from llm_engine.runtime.engine_dir import sha256_file
from llm_engine.runtime.onnx_backend import ONNX_FILE, plan_digest

BUILDER_VERSION = "0.1.0"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



def partition(graph: Graph, options: BuildOptions) -> tuple[list[Graph], PassReport]:
    """One graph per rank: passes before this one see the whole model, passes after it run
    once per rank."""
    if options.tp > 1 and options.pp > 1:
        return partition_tp_pp(graph, options.tp, options.pp)
    if options.pp > 1:
        return partition_pp(graph, options.pp)
    if options.tp > 1:
        return partition_tp(graph, options.tp)
    return [graph], PassReport("partition", notes=["a single rank"])


# The pass list is data: (name, function, can the user disable it?).
PASSES = [
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

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        check_options(self)
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
            if name in {n for n, _, optional in PASSES if not optional} or name == "lower_aten":
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


def _run_pass(fn, graph: Graph, options: BuildOptions, quant_env: QuantEnv | None
              ) -> tuple[Graph, PassReport]:
    if fn is fuse:
        disabled = frozenset(p.removeprefix("fuse.") for p in options.disabled_passes
                             if p.startswith("fuse."))
        return fn(graph, options, disabled=disabled)
    if fn is quantize:
        return fn(graph, options, quant_env)
    return fn(graph, options)


def run_passes(graph: Graph, options: BuildOptions, ui: BuildUI,
               quant_env: QuantEnv | None = None) -> tuple[list[Graph], list[PassReport]]:
    """Run the pass list; returns the rank graphs (one unless --tp) and the reports (for
    passes after the partition, rank 0's)."""
    graphs, reports = [graph], []
    for name, fn, _ in PASSES:
        if name in options.disabled_passes:
            reports.append(PassReport(name, notes=["disabled by --disable-pass"]))
            continue
        with ui.stage(f"pass {name}"):
            start = time.perf_counter()
            if fn is partition:
                graphs, report = partition(graphs[0], options)
            else:
                results = [_run_pass(fn, g, options, quant_env) for g in graphs]
                graphs, report = [g for g, _ in results], results[0][1]
            for rank, g in enumerate(graphs):
                try:
                    verify(g)
                except VerifyError as e:
                    where = f" (rank {rank})" if len(graphs) > 1 else ""
                    raise BuildError(f"pass {name} produced an invalid graph{where}: {e}") \
                        from e
            report.seconds = round(time.perf_counter() - start, 3)
            report.op_counts_after = graphs[0].op_counts()
            ui.note(report.summary())
        reports.append(report)
    return graphs, reports


def _resolve_max_seq_len(config, requested: int | None) -> int:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if requested is None:
        return int(limit or 4096)
    learned = getattr(config, "model_type", "") in ("gpt2",)
    if learned and limit and requested > limit:
        raise BuildError(f"--max-seq-len {requested} exceeds the model's {limit} learned "
                         "positions; pass at most that")
    return requested


def _eos_ids(source) -> list[int]:
    """EOS ids from config.json plus generation_config.json: instruct models often list
    their end-of-turn tokens only in the latter (e.g. Llama 3's <|eot_id|>), as vLLM reads."""
    found: list[int] = []
    values = [getattr(source.config, "eos_token_id", None)]
    gen_file = source.path / "generation_config.json" if source.kind == "hf" else None
    if gen_file is not None and gen_file.is_file():
        try:
            values.append(json.loads(gen_file.read_text()).get("eos_token_id"))
        except ValueError as e:
            raise BuildError(f"{gen_file}: not valid JSON ({e})") from e
    for ids in values:
        for i in [ids] if isinstance(ids, int) else list(ids or []):
            if i not in found:
                found.append(i)
    return found


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


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


def _export_onnx(out: EngineWriter, plan: dict) -> OnnxExport:
    """The CPU fast path's graph, from the plan as written (needs the `onnx` package, in the
    cpu and gpu extras; without it the engine runs on the reference executor)."""
    if importlib.util.find_spec("onnx") is None:
        return OnnxExport(False, "the onnx package is not installed (pip install onnx)")
    from llm_engine.builder.onnx_export import export_onnx

    return export_onnx(plan, out.path("weights.rank0.safetensors"), out.path(ONNX_FILE))


def build_engine(options: BuildOptions, ui: BuildUI | None = None) -> Path:
    ui = ui or BuildUI()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t0
        timings[stage] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()

    dtype = DTYPES[options.dtype]
    # Refuse an existing output before any slow work.
    EngineWriter(options.output, options.force)
    with ui.stage("open model"):
        source = open_model(options.model)
        max_seq_len = _resolve_max_seq_len(source.config, options.max_seq_len)
    lap("open_model")
    with ui.stage("trace (torch.export)"):
        traced = trace_model(source.config, dtype)
        aten_counts: dict[str, int] = {}
        for n in traced.program.graph_module.graph.nodes:
            if n.op == "call_function":
                aten_counts[str(n.target)] = aten_counts.get(str(n.target), 0) + 1
    lap("trace")
    with ui.stage("pass lower_aten"):
        graph, lower_report = lower_aten(traced, source.weights.__contains__)
        verify(graph)
        lower_report.op_counts_after = graph.op_counts()
        ui.note(lower_report.summary())
    lowered_counts = graph.op_counts()
    quant_env = QuantEnv(source.weights, traced.buffers,
                         source.load_tokenizer if source.has_tokenizer() else None,
                         int(source.config.vocab_size), max_seq_len, ui)
    graphs, passes = run_passes(graph, options, ui, quant_env)
    reports = [lower_report, *passes]
    graph = graphs[0]
    lap("passes")

    weight_bytes: dict[str, int] = {}
    with EngineWriter(options.output, options.force) as out:
        for rank, rank_graph in enumerate(graphs):
            label = f"write weights (rank {rank})" if len(graphs) > 1 else "write weights"
            with ui.stage(label):
                _write_rank_weights(out.path(f"weights.rank{rank}.safetensors"), rank_graph,
                                    source, traced.buffers, weight_bytes, ui)
            out.write_json(f"plan.rank{rank}.json", to_plan(rank_graph))
        lap("write_weights")
        onnx_export, cpu_graph = None, None
        if len(graphs) == 1 and options.device == "cpu":
            with ui.stage("onnx graph (CPU fast path)"):
                plan = json.loads(out.path("plan.rank0.json").read_text())
                onnx_export = _export_onnx(out, plan)
                if onnx_export.written:
                    cpu_graph = {"file": ONNX_FILE, "plan_sha256": plan_digest(plan)}
                else:
                    ui.note(f"no ONNX graph: {onnx_export.reason}; the CPU runtime will use "
                            "the reference executor")
        lap("onnx")
        has_tokenizer = source.has_tokenizer()
        if has_tokenizer:
            with ui.stage("tokenizer"):
                tokenizer = source.load_tokenizer()
                tokenizer.save_pretrained(str(out.path("tokenizer")))
                if not out.path("tokenizer/tokenizer.json").is_file():
                    raise BuildError("the model's tokenizer has no fast (tokenizer.json) form; "
                                     "the runtime needs one")
        else:
            ui.note("no tokenizer in the checkpoint: the engine takes token ids only")
        lap("tokenizer")
        sources: dict[str, str] = {}
        for g in graphs:  # kernels are named by their hash: ranks share identical ones
            sources.update(g.meta.get("codegen", {}).get("sources", {}))
        for name, text in sorted(sources.items()):
            out.path(f"kernels/{name}.py").write_text(text)
        plan_memory = graph.meta.get("memory", {})
        report = {
            "passes": [r.to_json() for r in reports],
            "op_counts": {"traced_aten": dict(sorted(aten_counts.items())),
                          "lowered": lowered_counts, "final": graph.op_counts()},
            "weights": {"count": len(graph.weights), "bytes_by_dtype": weight_bytes,
                        "bytes": sum(weight_bytes.values())},
            "memory": {k: v for k, v in plan_memory.items() if k != "assignment"},
            **({"partition": graph.meta["partition"]["report"]}
               if "report" in graph.meta.get("partition", {}) else {}),
            **({"quantization": graph.meta["quantization"]}
               if "quantization" in graph.meta else {}),
            **({"onnx": onnx_export.to_json()} if onnx_export else {}),
            "timings_s": timings,
            "peak_rss_mb": _peak_rss_mb(),
        }
        out.write_json("report.json", report)
        files = {}
        assert out.tmp is not None
        for p in sorted(out.tmp.rglob("*")):
            if p.is_file():
                files[str(p.relative_to(out.tmp))] = {"sha256": sha256_file(p),
                                                      "bytes": p.stat().st_size}
        config = source.config.to_dict()
        config.pop("quantization_config", None)
        out.write_json("engine.json", {
            "format_version": FORMAT_VERSION,
            "builder_version": BUILDER_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "model": {"architecture": traced.architecture, "source": str(source.path),
                      "source_kind": source.kind, "config": config},
            "build": {**{k: (str(v) if isinstance(v, Path) else v)
                         for k, v in asdict(options).items()
                         if k not in ("output", "force", "model", "calib_cache")},
                      "disabled_passes": list(options.disabled_passes),
                      "max_seq_len": max_seq_len},
            "target": {"device": options.device, "dtype": options.dtype},
            "ranks": len(graphs),
            "parallel": {"tp": options.tp, "pp": options.pp},
            "tokenizer": "tokenizer" if has_tokenizer else None,
            "cpu_graph": cpu_graph,
            "kv_cache": graph.meta.get("kv_cache"),
            "generation": {"eos_token_ids": _eos_ids(source),
                           "bos_token_id": getattr(source.config, "bos_token_id", None),
                           "max_seq_len": max_seq_len,
                           "vocab_size": int(source.config.vocab_size)},
            "files": files,
        })
    lap("finalize")
    return options.output

