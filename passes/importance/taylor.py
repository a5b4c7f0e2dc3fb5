"""First-order Taylor importance: the size of the loss change if a unit's weights were zeroed.

    s_m(u) = sum_batches sum_{i in slice_m(u)} | w_i * dL/dw_i |

summed per member, then aggregated over the group's members (mean-normalised sum,
``base.aggregate``). Molchanov et al., "Importance Estimation for Neural Network Pruning"
(CVPR 2019); the loss is the task loss when batches carry targets, else the sampled-target
self-distillation loss of ``gradients.py`` (a plain KD loss has zero gradient at the teacher).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from potstill.inputs.data import Batch
from potstill.state import CompileState
from torch import nn

from .base import (
    DEFAULT_CALIB_BATCHES,
    ImportanceEstimator,
    aggregate,
    estimator,
    parameter_members,
    per_index_reduce,
    per_unit,
    resolve,
)
from .gradients import for_each_gradient

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis, CoupledGroup


def weight_gradient_scores(
    model: nn.Module,
    teacher: nn.Module | None,
    groups: Sequence[CoupledGroup],
    data: Sequence[Batch],
    statistic: str,
    normalize: bool,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Per-unit scores from parameter gradients: ``statistic`` "taylor" sums ``|w * g|``, "fisher"
    sums ``g^2`` (averaged over batches), then members are aggregated (``base.aggregate``)."""
    members = {g.id: parameter_members(model, g) for g in groups}
    acc: dict[tuple[int, int], np.ndarray] = {}

    def on_gradients() -> None:
        for g in groups:
            for k, (m, t) in enumerate(members[g.id]):
                if t.grad is None:
                    continue
                if statistic == "taylor":
                    stat = per_index_reduce(t.detach() * t.grad, m.dim, "abs")
                else:
                    stat = per_index_reduce(t.grad, m.dim, "sq")
                acc[(g.id, k)] = acc.get((g.id, k), 0) + stat

    for_each_gradient(model, teacher, data, on_gradients, seed=seed)
    out: dict[int, np.ndarray] = {}
    for g in groups:
        member_scores = [
            per_unit(g, m, acc[(g.id, k)] / max(len(data), 1))
            for k, (m, _) in enumerate(members[g.id])
            if (g.id, k) in acc
        ]
        out[g.id] = aggregate(member_scores, g.n_units, normalize)
    return out


@estimator
@dataclass(frozen=True)
class TaylorImportance(ImportanceEstimator):
    """``importance.taylor{batches=8}``: ``|w * dL/dw|`` summed over each unit's weights."""

    name: ClassVar[str] = "taylor"

    batches: int = DEFAULT_CALIB_BATCHES
    normalize: bool = True

    def scores(
        self,
        target: CompileState | nn.Module,
        analysis: Analysis,
        batches: Iterable[Any] | None = None,
    ) -> dict[int, np.ndarray]:
        model, teacher, state = resolve(target)
        data = self.batches_for(target, batches, self.batches)
        return weight_gradient_scores(model, teacher, analysis.prunable(), data, "taylor", self.normalize,
                                      seed=state.seed if state else 0)
