"""What lowering returns: the engine files and the record of parity and latency."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Artifact:
    """One lowered student for one target.

    ``parity``: ``max_abs`` = max|engine − torch| and ``rel`` = max_abs / max|torch| over the
    held-out inputs, ``ok`` against the profile's tolerance, ``n_inputs`` checked.
    ``latency_ms``: ``median``, ``p90`` and ``runs`` of the engine at the example input.
    """

    target: str
    precision: str
    files: dict[str, Path] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "precision": self.precision,
            "files": {k: str(v) for k, v in self.files.items()},
            "parity": dict(self.parity),
            "latency_ms": dict(self.latency_ms),
            "notes": list(self.notes),
        }
