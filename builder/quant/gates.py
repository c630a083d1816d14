"""The build's accuracy gates (--max-ppl-increase, --min-greedy-agreement): measured on
held-out text after quantizing; a failed gate writes no engine, only the report beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_engine.builder.errors import BuildError
from llm_engine.builder.quant.config import QuantConfig


def gates(config: QuantConfig, quality) -> dict[str, Any]:
    failed = []
    if config.max_ppl_increase is not None and \
            quality.ppl_increase_pct > config.max_ppl_increase:
        failed.append(f"perplexity +{quality.ppl_increase_pct:.2f}% > --max-ppl-increase "
                      f"{config.max_ppl_increase}%")
    if config.min_greedy_agreement is not None and \
            quality.greedy_agreement < config.min_greedy_agreement:
        failed.append(f"greedy agreement {quality.greedy_agreement:.3f} < "
                      f"--min-greedy-agreement {config.min_greedy_agreement}")
    return {"max_ppl_increase": config.max_ppl_increase,
            "min_greedy_agreement": config.min_greedy_agreement, "failed": failed}


def gate_report_path(output: Path) -> Path:
    return Path(output).with_name(Path(output).name + ".quant-report.json")


def fail_gate(config: QuantConfig, qreport: dict, failed: list[str], worst) -> None:
    path = gate_report_path(config.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(qreport, indent=1))
    layers = ", ".join(f"{n} ({e:.3f})" for n, e in worst[:3])
    raise BuildError(f"quantized engine fails the accuracy gate: {'; '.join(failed)} on "
                     f"{qreport['quality']['tokens']} held-out tokens; largest output error: "
                     f"{layers or 'n/a'}; no engine written, report: {path}")
