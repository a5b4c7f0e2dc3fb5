"""First-order Taylor importance: the size of the loss change if a unit's weights were zeroed.

    s_m(u) = sum_batches sum_{i in slice_m(u)} | w_i * dL/dw_i |

summed per member, then aggregated over the group's members (mean-normalised sum,
``base.aggregate``). Molchanov et al., "Importance Estimation for Neural Network Pruning"
(CVPR 2019); the loss is the task loss when batches carry targets, else the sampled-target
self-distillation loss of ``gradients.py`` (a plain KD loss has zero gradient at the teacher).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from potstill.pipeline import register_pass
from potstill.state import CompileState
from torch import nn

from .base import (
    DEFAULT_CALIB_BATCHES,
    ImportanceEstimator,
    ImportancePass,
    aggregate,
    parameter_members,
    per_index_reduce,
    per_unit,
    resolve,
)
from .gradients import for_each_gradient

if TYPE_CHECKING:
    from potstill.ir import Analysis


class GradientImportance(ImportanceEstimator):
    """Shared by Taylor and Fisher: accumulate a per-index gradient statistic per member."""

    #: "taylor" accumulates |w*g|; "fisher" accumulates g^2
    statistic: ClassVar[str] = "taylor"

    def __init__(self, normalize: bool = True, batches: int = DEFAULT_CALIB_BATCHES) -> None:
        self.normalize = normalize
        self.limit = batches

    def scores(
        self,
        target: CompileState | nn.Module,
        analysis: Analysis,
        batches: Iterable[Any] | None = None,
    ) -> dict[int, np.ndarray]:
        model, teacher, state = resolve(target)
        data = self.batches_for(target, batches, self.limit)
        groups = analysis.prunable()
        members = {g.id: parameter_members(model, g) for g in groups}
        acc: dict[tuple[int, int], np.ndarray] = {}

        def on_gradients() -> None:
            for g in groups:
                for k, (m, t) in enumerate(members[g.id]):
                    if t.grad is None:
                        continue
                    if self.statistic == "taylor":
                        stat = per_index_reduce(t.detach() * t.grad, m.dim, "abs")
                    else:
                        stat = per_index_reduce(t.grad, m.dim, "sq")
                    acc[(g.id, k)] = acc.get((g.id, k), 0) + stat

        for_each_gradient(model, teacher, data, on_gradients, seed=state.seed if state else 0)
        out: dict[int, np.ndarray] = {}
        for g in groups:
            member_scores = [
                per_unit(g, m, acc[(g.id, k)] / max(len(data), 1))
                for k, (m, _) in enumerate(members[g.id])
                if (g.id, k) in acc
            ]
            out[g.id] = aggregate(member_scores, g.n_units, self.normalize)
        return out


class TaylorImportance(GradientImportance):
    """``|w * dL/dw|`` summed over each unit's weights."""

    name: ClassVar[str] = "taylor"
    statistic: ClassVar[str] = "taylor"


@dataclass(frozen=True)
class GradientOptions:
    batches: int = DEFAULT_CALIB_BATCHES
    normalize: bool = True


@register_pass
class TaylorImportancePass(ImportancePass):
    """``importance.taylor{batches=8}``: first-order Taylor scores on calibration batches."""

    name: ClassVar[str] = "importance.taylor"
    Options: ClassVar[type] = GradientOptions

    def estimator(self) -> ImportanceEstimator:
        return TaylorImportance(self.options.normalize, self.options.batches)
