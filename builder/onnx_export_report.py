"""What `engine build` records about the CPU graph (report.json -> onnx); importable without
the onnx package."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_engine.runtime.onnx_backend import ONNX_FILE


@dataclass
class OnnxExport:
    written: bool
    reason: str | None = None
    nodes: int = 0
    lowerings: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"written": self.written}
        if self.reason:
            out["reason"] = self.reason
        if self.written:
            out |= {"file": ONNX_FILE, "nodes": self.nodes, "lowerings": self.lowerings}
        return out
