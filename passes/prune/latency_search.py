"""The latency-constrained mask search as ``prune.width`` runs it (Kwon et al. 2022, §4.1).

Applies where every group pruned is attention heads or feed-forward neurons, the scores are on one
loss scale (the mask Fisher), the budget is ``ratio`` and the profile has
no measured latency table but runs ONNX Runtime on this machine's CPU (``cpu``): then each group's
sublayer is timed here (``sublayer_latency.py``; groups of one shape share one table) at the token
count of the calibration batches, and ``mask_search.search_latency`` allocates. ``--ratio R`` then
asks for ``R`` of the predicted latency of the pruned sublayers removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .align import unit_step
from .mask_search import SearchResult, search_latency
from .sublayer_latency import KINDS, PiecewiseLatency, SublayerTable, measure_sublayer

if TYPE_CHECKING:
    from potstill.ir.capture import CoupledGroup
    from potstill.state import CompileState

#: tables measured in this process: (kind, n_units, unit_channels, hidden, batch, seq, threads)
_TABLES: dict[tuple[int | str | None, ...], SublayerTable] = {}


def applies(state: CompileState, groups: Sequence[CoupledGroup], comparable: bool) -> bool:
    """Whether the host-measured latency search is the allocation (module docstring)."""
    profile = state.profile
    return (comparable and bool(groups) and all(g.kind in KINDS for g in groups)
            and getattr(profile, "latency_table", None) is None
            and getattr(profile, "target", None) == "onnxruntime" and getattr(profile, "device", None) == "cpu")


def _hidden(model: nn.Module, g: CoupledGroup) -> int | None:
    """The input width of the linear layers that produce the group's units."""
    modules = dict(model.named_modules())
    widths = {int(mod.in_features) for m in g.members if m.role == "out" and m.dim == 0
              and isinstance(mod := modules.get(m.module), nn.Linear)}  # fmt: skip
    return widths.pop() if len(widths) == 1 else None


def _tokens(batches: Sequence[Any]) -> tuple[int, int]:
    """(batch, sequence) of the first calibration batch's token ids."""
    for b in batches:
        for v in (*getattr(b, "args", ()), *getattr(b, "kwargs", {}).values()):
            if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point():
                return int(v.shape[0]), int(v.shape[1])
    return 1, 32


def sublayer_tables(state: CompileState, model: nn.Module, groups: Sequence[CoupledGroup], batches: Sequence[Any],
                    multiple: int) -> dict[int, SublayerTable] | None:  # fmt: skip
    """A measured table per group (shared by groups of one shape); None when a group's producer
    width cannot be read (not a stack of linear layers)."""
    batch, seq = _tokens(batches)
    threads = getattr(state.profile, "threads", None)
    out: dict[int, SublayerTable] = {}
    for g in groups:
        hidden = _hidden(model, g)
        if hidden is None:
            return None
        key = (g.kind, g.n_units, g.unit_channels, hidden, batch, seq, threads)
        if key not in _TABLES:
            _TABLES[key] = measure_sublayer(g.kind, g.n_units, g.unit_channels, hidden, batch, seq, threads,
                                            step=unit_step(g.unit_channels, multiple))
        out[g.id] = _TABLES[key]
    return out


@dataclass(frozen=True)
class LatencyAllocation:
    """What the search chose, and the record it leaves in ``metrics["prune"]``."""

    result: SearchResult
    tables: dict[int, SublayerTable]
    asked: str

    def record(self) -> dict[str, Any]:
        shapes = {id(t): t.record() for t in self.tables.values()}
        return {"asked": self.asked, "what": "ms (sublayers, measured here)", "limit": self.result.budget_ms,
                "full": self.result.full_ms, "predicted": self.result.predicted_ms,
                "met": self.result.predicted_ms <= self.result.budget_ms * 1.001, "tables": list(shapes.values())}


def allocate_latency(state: CompileState, model: nn.Module, groups: Sequence[CoupledGroup],
                     scores: dict[int, np.ndarray], batches: Sequence[Any], *, ratio: float,
                     multiple: int, floor: float) -> LatencyAllocation | None:  # fmt: skip
    """Kept units per group by the latency search, or None when it does not apply here."""
    tables = sublayer_tables(state, model, groups, batches, multiple)
    if tables is None:
        return None
    latency: dict[int, PiecewiseLatency] = {gid: t.fit for gid, t in tables.items()}
    full = sum(latency[g.id](g.n_units) for g in groups)
    limit, asked = (1 - ratio) * full, f"ratio {ratio:g} of the sublayers' latency (measured here)"
    result = search_latency(groups, scores, latency, limit, multiple=multiple, floor=floor)
    return LatencyAllocation(result, tables, asked)
