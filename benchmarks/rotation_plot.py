#!/usr/bin/env python
"""What rotation does to a quantized engine's GEMM inputs, per layer, from the builds' own
report.json: the calibration activations' max / mean |x| (how far the largest value stands out,
which sets a per-token int8 step) and each GEMM's output error on calibration rows.

    python benchmarks/rotation_plot.py \\
        --engine none=engines/smollm2-int8-sq-rotation-none \\
        --engine online=engines/smollm2-int8-sq \\
        [--out benchmarks/results/rotation/outliers.png]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KINDS = [("q_proj+k_proj+v_proj", "q/k/v input (norm output)"),
         ("o_proj", "o_proj input (attention output)"),
         ("gate_proj+up_proj", "gate/up input (norm output)"),
         ("down_proj", "down input (SiLU(gate)·up)")]
_LAYER = re.compile(r"layers\.(\d+)\.")


def per_layer(report: dict, kind: str, key) -> tuple[list[int], list[float]]:
    rows = []
    for name, entry in report["layers"].items():
        m = _LAYER.search(name)
        if m and f".{kind}." in name:
            rows.append((int(m.group(1)), key(entry)))
    rows.sort()
    return [r[0] for r in rows], [r[1] for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", required=True, metavar="LABEL=DIR")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/rotation/outliers.png")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = []
    for spec in args.engine:
        label, _, path = spec.partition("=")
        report = json.loads((Path(path) / "report.json").read_text())["quantization"]
        engines.append((label, report))
    fig, axes = plt.subplots(2, len(KINDS), figsize=(4.2 * len(KINDS), 6.5), sharex=True)
    for col, (kind, title) in enumerate(KINDS):
        for label, report in engines:
            mode = report["mode"]
            x, ratio = per_layer(report, kind, lambda e: e["act_absmax"] / e["act_absmean"])
            axes[0, col].plot(x, ratio, marker=".", label=f"{mode}, rotation {label}")
            x, err = per_layer(report, kind, lambda e: e["output_rel_error"])
            axes[1, col].plot(x, err, marker=".", label=f"{mode}, rotation {label}")
        axes[0, col].set_title(title, fontsize=10)
        axes[0, col].set_yscale("log")
        axes[1, col].set_xlabel("layer")
    axes[0, 0].set_ylabel("max / mean |x| (calibration)")
    axes[1, 0].set_ylabel("GEMM output rel. error")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: GEMM inputs before and after rotation", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
