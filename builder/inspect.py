"""`engine inspect`: what an engine directory holds, as a table, JSON, or a drawing of its plan.

Everything here reads the files `engine build` wrote and nothing else: no torch, no tensors
(weights are summarised from the safetensors header alone), so inspecting a multi-GB engine
is instant and works on a machine that cannot run it.

This file reads the engine and prints its summary; the plan drawing (`--graph`) is in
inspect_graph.py and the kernel listing (`--kernels`) in inspect_kernels.py, both reading
the engine through the helpers here.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

# safetensors dtype tags -> bytes per element; the header's data_offsets already give each
# tensor's size, this is only for the KV cache estimate.
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int8": 1, "uint8": 1,
             "float8_e4m3fn": 1, "float8_e5m2": 1}
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

# Op families for colouring and the "ops by kind" count. kernels.ops.OPS holds the same
# families, but importing it pulls in torch; inspect stays a pure file reader.
_KINDS: dict[str, frozenset[str]] = {
    "source": frozenset({"input", "weight"}),
    "attention": frozenset({"sdpa", "paged_attention"}),
    "gemm": frozenset({"linear", "matmul", "embedding"}),
    "norm": frozenset({"rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm"}),
    "view": frozenset({"reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand",
                       "slice", "select", "getitem"}),
    "copy": frozenset({"cat", "index_select", "pad"}),
    "reduction": frozenset({"mean", "sum", "amax", "softmax"}),
}
COLOURS = {"source": "#d7bde2", "attention": "#f5a3a3", "gemm": "#9ec5f0", "norm": "#b9e0a5",
           "pointwise": "#fbe38e", "view": "#e3e3e3", "copy": "#f8c58c", "reduction": "#f8c58c"}
# report.json fuse stats that count nodes rather than fusions made.
_FUSE_NON_RULES = frozenset({"nodes_before", "nodes_after"})


class InspectError(Exception):
    """The engine dir or an option is unusable; the CLI prints the message as one line."""


# ---- reading -----------------------------------------------------------------------------

def read_json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise InspectError(f"{path} not found; is {path.parent} an engine directory "
                               "written by `engine build`?")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InspectError(f"{path} is not valid JSON ({e}); rebuild the engine with "
                           "`engine build --force`") from e
    if not isinstance(data, dict):
        raise InspectError(f"{path} does not hold a JSON object; rebuild the engine with "
                           "`engine build --force`")
    return data


def engine_path(engine_dir: Path | str) -> Path:
    path = Path(engine_dir)
    if not path.is_dir():
        raise InspectError(f"engine directory {path} not found; build one with "
                           "`engine build --model ... --output DIR`")
    return path


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: 8-byte little-endian length, then the JSON."""
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > 100_000_000:  # a corrupt length would otherwise try to read GBs
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as e:
        raise InspectError(f"{path} is not a readable safetensors file ({e}); rebuild the "
                           "engine with `engine build --force`") from e
    return header


def weights_by_dtype(engine_dir: Path) -> dict[str, dict[str, int]]:
    """dtype -> {count, bytes} over every rank's weight file, from headers only."""
    out: dict[str, dict[str, int]] = {}
    for path in sorted(engine_dir.glob("weights.rank*.safetensors")):
        for name, info in safetensors_header(path).items():
            if name == "__metadata__":
                continue
            try:
                dtype = _ST_DTYPES.get(info["dtype"], str(info["dtype"]).lower())
                start, end = info["data_offsets"]
            except (KeyError, TypeError, ValueError) as e:
                raise InspectError(f"{path}: header entry {name!r} is malformed; rebuild the "
                                   "engine with `engine build --force`") from e
            entry = out.setdefault(dtype, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += end - start
    return dict(sorted(out.items()))


def disk_bytes(engine_dir: Path) -> int:
    return sum(p.stat().st_size for p in engine_dir.rglob("*") if p.is_file())


def op_kind(op: str) -> str:
    for kind, ops in _KINDS.items():
        if op in ops:
            return kind
    # Everything left is elementwise: unary/binary math, and the fused pointwise, rope and
    # gated_act kernels, which are elementwise too.
    return "pointwise"


# ---- summary -----------------------------------------------------------------------------

def _fusions(passes: list[dict[str, Any]]) -> dict[str, int]:
    for report in passes:
        if report.get("name") == "fuse":
            stats = report.get("stats") or {}
            return {k: v for k, v in stats.items()
                    if k not in _FUSE_NON_RULES and isinstance(v, int) and v > 0}
    return {}


def _kv_cache(kv: dict[str, Any] | None) -> dict[str, Any] | None:
    if not kv or not kv.get("layers"):
        return None
    layers = kv["layers"]

    def distinct(key: str) -> Any:
        # Most models are uniform; list the values only where layers differ.
        values = sorted({layer.get(key) for layer in layers}, key=str)
        return values[0] if len(values) == 1 else values

    per_token = sum(2 * layer.get("num_kv_heads", 0) * layer.get("head_dim", 0)
                    * _ITEMSIZE.get(layer.get("dtype", ""), 0) for layer in layers)
    return {"layers": len(layers), "num_kv_heads": distinct("num_kv_heads"),
            "head_dim": distinct("head_dim"), "dtype": distinct("dtype"),
            "window": distinct("window"), "bytes_per_token": per_token}


def _memory(memory: dict[str, Any] | None) -> dict[str, Any] | None:
    if not memory:
        return None
    return {"max_batch_tokens": memory.get("max_batch_tokens"),
            "activation_bytes_no_reuse": memory.get("no_reuse_bytes"),
            "activation_bytes_planned": memory.get("planned_bytes"),
            "peak_live_bytes": memory.get("peak_live_bytes"),
            "buffers": len(memory.get("buffers") or [])}


def summarize(engine_dir: Path | str) -> dict[str, Any]:
    """Everything `engine inspect` shows, as plain JSON-ready data; absent parts are None."""
    path = engine_path(engine_dir)
    engine = read_json(path / "engine.json", required=True)
    assert engine is not None
    report = read_json(path / "report.json", required=False) or {}
    plan = read_json(path / "plan.rank0.json", required=False)

    model = engine.get("model") or {}
    build = engine.get("build") or {}
    if plan is not None:
        ops = dict(sorted(Counter(n.get("op", "?") for n in plan.get("nodes", [])).items()))
    else:  # an engine without its plan cannot run, but report.json still says what it held
        ops = dict((report.get("op_counts") or {}).get("final") or {})
    kinds = Counter()
    for op, n in ops.items():
        kinds[op_kind(op)] += n
    counts = report.get("op_counts") or {}
    timings = report.get("timings_s") or {}
    passes = report.get("passes") or []
    return {
        "engine_dir": str(path),
        "model": {"architecture": model.get("architecture"), "source": model.get("source"),
                  "source_kind": model.get("source_kind")},
        "target": engine.get("target") or {},
        "ranks": engine.get("ranks", 1),
        "parallel": engine.get("parallel") or {"tp": 1, "pp": 1},
        "format_version": engine.get("format_version"),
        "builder_version": engine.get("builder_version"),
        "created": engine.get("created"),
        "max_seq_len": build.get("max_seq_len"),
        "disabled_passes": build.get("disabled_passes") or [],
        "ops": ops,
        "ops_by_kind": dict(kinds.most_common()),
        "op_totals": {"traced": sum((counts.get("traced_aten") or {}).values()) or None,
                      "lowered": sum((counts.get("lowered") or {}).values()) or None,
                      "final": sum(ops.values()) or None},
        "fusions": _fusions(passes),
        "passes": [{"name": p.get("name"), "seconds": p.get("seconds"),
                    "notes": p.get("notes") or []} for p in passes],
        "weights": weights_by_dtype(path),
        "disk_bytes": disk_bytes(path),
        "kv_cache": _kv_cache(engine.get("kv_cache")),
        "memory": _memory(report.get("memory") or (plan or {}).get("memory")),
        "build_seconds": round(sum(timings.values()), 3) if timings else None,
        "build_timings_s": timings,
        "peak_rss_mb": report.get("peak_rss_mb"),
    }


# ---- printing ----------------------------------------------------------------------------

def _size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "—"
    return str(value)


def print_summary(summary: dict[str, Any], as_json: bool = False) -> None:
    if as_json:
        # Plain print, not rich: rich would wrap and colour it, and callers pipe this to jq.
        print(json.dumps(summary, indent=2))
        return
    from rich.columns import Columns
    from rich.console import Console
    from rich.table import Table

    console = Console()
    model, target = summary["model"], summary["target"]
    overview = Table(title=f"engine {summary['engine_dir']}", show_header=False,
                     title_justify="left")
    overview.add_column(style="bold")
    overview.add_column()
    rows = [
        ("model", _text(model.get("architecture"))),
        ("source", f"{_text(model.get('source'))} ({_text(model.get('source_kind'))})"),
        ("target", f"{_text(target.get('device'))} / {_text(target.get('dtype'))}"),
        ("ranks", f"{summary['ranks']} (tp={summary['parallel'].get('tp', 1)}, "
                  f"pp={summary['parallel'].get('pp', 1)}; plan and kv cache below: rank 0)"
         if summary["ranks"] > 1 else "1"),
        ("format / builder", f"{_text(summary['format_version'])} / "
                             f"{_text(summary['builder_version'])}"),
        ("created", _text(summary["created"])),
        ("max seq len", _text(summary["max_seq_len"])),
        ("disabled passes", _text(summary["disabled_passes"])),
        ("size on disk", _size(summary["disk_bytes"])),
        ("build time", "—" if summary["build_seconds"] is None
         else f"{summary['build_seconds']:.1f} s (peak RSS {_text(summary['peak_rss_mb'])} MB)"),
    ]
    totals = summary["op_totals"]
    rows.append(("ops traced → lowered → final", " → ".join(
        _text(totals.get(k)) for k in ("traced", "lowered", "final"))))
    if kv := summary["kv_cache"]:
        rows.append(("kv cache", f"{kv['layers']} layers × {_text(kv['num_kv_heads'])} kv heads "
                                 f"× head_dim {_text(kv['head_dim'])} ({_text(kv['dtype'])}, "
                                 f"{_size(kv['bytes_per_token'])}/token)"))
    if mem := summary["memory"]:
        rows.append(("activations", f"{_size(mem['activation_bytes_no_reuse'])} without reuse → "
                                    f"{_size(mem['activation_bytes_planned'])} in "
                                    f"{mem['buffers']} buffers at T={_text(mem['max_batch_tokens'])}"))
    for key, value in rows:
        overview.add_row(key, value)
    console.print(overview)

    ops = Table(title="ops in the plan", title_justify="left")
    ops.add_column("kind")
    ops.add_column("count", justify="right")
    ops.add_column("ops")
    for kind, count in summary["ops_by_kind"].items():
        members = ", ".join(f"{op} {n}" for op, n in summary["ops"].items() if op_kind(op) == kind)
        ops.add_row(f"[on {COLOURS.get(kind, '#ffffff')}] [/] {kind}", str(count), members)
    console.print(ops)

    fusions = Table(title="fusions (pass fuse)", title_justify="left")
    fusions.add_column("rule")
    fusions.add_column("applied", justify="right")
    for rule, n in summary["fusions"].items():
        fusions.add_row(rule, str(n))
    weights = Table(title="weights", title_justify="left")
    weights.add_column("dtype")
    weights.add_column("tensors", justify="right")
    weights.add_column("size", justify="right")
    for dtype, w in summary["weights"].items():
        weights.add_row(dtype, str(w["count"]), _size(w["bytes"]))
    console.print(Columns([fusions, weights], padding=(0, 4)))
