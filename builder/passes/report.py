"""What a pass did, in a form that goes into report.json and the build's progress display."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PassReport:
    name: str
    changed: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    op_counts_after: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        stats = ", ".join(f"{k}={v}" for k, v in self.stats.items() if v not in (0, None, {}))
        return f"{self.name}: {stats or 'no change'}"
