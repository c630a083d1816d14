"""Write an engine directory atomically, streaming weights tensor by tensor, and assemble
its report.json and engine.json manifest.

Everything goes into a temporary directory beside the target, which is renamed into place
only when complete, so an interrupted or failed build (disk full included) never leaves a
half engine. The weight file is safetensors written by hand: its header is known from the
graph before any tensor is read, so each tensor is produced, written and dropped in turn.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import resource
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llm_engine.builder.errors import BuildError
from llm_engine.kernels.dtypes import itemsize
from llm_engine.runtime.engine_dir import sha256_file

if TYPE_CHECKING:
    from llm_engine.builder.frontend.source import ModelSource
    from llm_engine.builder.frontend.trace import Traced
    from llm_engine.builder.ir import Graph
    from llm_engine.builder.onnx_export_report import OnnxExport
    from llm_engine.builder.passes.report import PassReport

BUILDER_VERSION = "0.1.0"
FORMAT_VERSION = 1

_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL", "float8_e4m3fn": "F8_E4M3"}


def write_safetensors_streaming(path: Path, specs: list[tuple[str, tuple[int, ...], str]],
                                tensors: Iterable[tuple[str, torch.Tensor]],
                                on_tensor: Callable[[str], None] | None = None) -> str:
    """Write tensors (yielded in `specs` order) to a safetensors file; returns its sha256."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "llm-engine"}}
    offset = 0
    for name, shape, dtype in specs:
        n = itemsize(dtype)
        for s in shape:
            n *= s
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    # Pad the header so tensor data starts 64-byte aligned in the (page-aligned) memory map:
    # GEMMs on 8-byte-aligned weights measured ~10% slower.
    blob += b" " * (-(8 + len(blob)) % 64)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(blob)), blob):
            f.write(chunk)
            digest.update(chunk)
        expected = iter(specs)
        for name, tensor in tensors:
            want = next(expected)
            if name != want[0] or tuple(tensor.shape) != tuple(want[1]):
                raise BuildError(f"weight stream out of order at {name}")
            # reshape(-1): a 0-dim tensor (a scalar weight, e.g. a scaling factor) has no
            # byte view of its own
            data = (tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data
                    if tensor.numel() else b"")
            f.write(data)
            digest.update(data)
            if on_tensor:
                on_tensor(name)
    return digest.hexdigest()


class EngineWriter:
    """Context manager: files go to a temp dir; on success it replaces `target`."""

    def __init__(self, target: Path, force: bool) -> None:
        self.target = target
        self.force = force
        if target.exists() and not force:
            raise BuildError(f"output {target} already exists; pass --force to replace it")
        if target.exists() and not (target / "engine.json").is_file() and any(target.iterdir()):
            raise BuildError(f"output {target} exists and is not an engine; refusing to replace it")
        self.tmp: Path | None = None

    def __enter__(self) -> EngineWriter:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-",
                                         dir=self.target.parent))
        return self

    def path(self, name: str) -> Path:
        assert self.tmp is not None
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, name: str, obj: Any) -> None:
        self.path(name).write_text(json.dumps(obj, indent=1) + "\n")

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise BuildError(f"writing the engine failed: {exc.strerror or exc} "
                                 f"({getattr(exc, 'filename', None) or self.target}); "
                                 "nothing was left behind") from exc
            return False
        self.tmp.chmod(0o755)
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            self.target.rename(old)
            self.tmp.rename(self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.target)
        return False


# ---- report.json and engine.json --------------------------------------------------------------
def engine_report(traced: Traced, graphs: list[Graph], reports: list[PassReport], *,
                  weight_bytes: dict[str, int], onnx: OnnxExport | None,
                  timings: dict[str, float]) -> dict[str, Any]:
    """report.json: what each pass did, op counts traced/lowered/final, weight bytes by dtype,
    the memory plan, the partition, quantization and ONNX reports (rank 0's where per rank),
    stage timings and the build's peak RSS."""
    graph = graphs[0]
    traced_aten: dict[str, int] = {}
    for n in traced.program.graph_module.graph.nodes:
        if n.op == "call_function":
            traced_aten[str(n.target)] = traced_aten.get(str(n.target), 0) + 1
    lowered = next(r.op_counts_after for r in reports if r.name == "lower_aten")
    memory = graph.meta.get("memory", {})
    return {
        "passes": [r.to_json() for r in reports],
        "op_counts": {"traced_aten": dict(sorted(traced_aten.items())),
                      "lowered": lowered, "final": graph.op_counts()},
        "weights": {"count": len(graph.weights), "bytes_by_dtype": weight_bytes,
                    "bytes": sum(weight_bytes.values())},
        "memory": {k: v for k, v in memory.items() if k != "assignment"},
        **({"partition": graph.meta["partition"]["report"]}
           if "report" in graph.meta.get("partition", {}) else {}),
        **({"quantization": graph.meta["quantization"]}
           if "quantization" in graph.meta else {}),
        **({"onnx": onnx.to_json()} if onnx else {}),
        "timings_s": timings,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def engine_manifest(out: EngineWriter, options: Any, source: ModelSource, traced: Traced,
                    graphs: list[Graph], *, max_seq_len: int,
                    cpu_graph: dict[str, Any] | None) -> dict[str, Any]:
    """engine.json: the format, the model and how it was built, the ranks, the KV cache, what
    generation needs, and the sha256 and size of every file written so far (so it goes last).
    `options` is the BuildOptions the build was asked for."""
    assert out.tmp is not None
    files = {str(p.relative_to(out.tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(out.tmp.rglob("*")) if p.is_file()}
    config = source.config.to_dict()
    config.pop("quantization_config", None)
    return {
        "format_version": FORMAT_VERSION,
        "builder_version": BUILDER_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {"architecture": traced.architecture, "source": str(source.path),
                  "source_kind": source.kind, "config": config},
        "build": {**{k: (str(v) if isinstance(v, Path) else v)
                     for k, v in asdict(options).items()
                     if k not in ("output", "force", "model", "calib_cache", "quant_config")},
                  "disabled_passes": list(options.disabled_passes),
                  "max_seq_len": max_seq_len},
        "target": {"device": options.device, "dtype": options.dtype},
        "ranks": len(graphs),
        "parallel": {"tp": options.tp, "pp": options.pp},
        "tokenizer": "tokenizer" if any(f.startswith("tokenizer/") for f in files) else None,
        "cpu_graph": cpu_graph,
        "kv_cache": graphs[0].meta.get("kv_cache"),
        "generation": {"eos_token_ids": _eos_ids(source),
                       "bos_token_id": getattr(source.config, "bos_token_id", None),
                       "max_seq_len": max_seq_len,
                       "vocab_size": int(source.config.vocab_size)},
        "files": files,
    }


def _eos_ids(source: ModelSource) -> list[int]:
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
