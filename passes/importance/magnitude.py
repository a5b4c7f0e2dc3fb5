"""Magnitude importance: the Lp norm of the weights a unit owns.

For a unit ``u`` of a coupled group and each parameter member ``m`` (conv/linear out- and
in-slices, norm weights and biases, embedding columns), the member score is

    s_m(u) = ( sum_{i in slice_m(u)} |w_i|^p )^(1/p)        p in {1, 2}

and the group score is the (mean-normalised) sum over members (``base.aggregate``). This is the
data-free criterion of Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017), applied
group-wise as in DepGraph / Torch-Pruning (Fang et al., CVPR 2023).
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
    ImportanceEstimator,
    ImportancePass,
    aggregate,
    parameter_members,
    per_index_reduce,
    per_unit,
    resolve,
)

if TYPE_CHECKING:
    from potstill.ir import Analysis


class MagnitudeImportance(ImportanceEstimator):
    """L1 (``p=1``) or L2 (``p=2``) norm of each unit's weights, summed over the group."""

    name: ClassVar[str] = "magnitude"

    def __init__(self, p: int = 2, normalize: bool = True) -> None:
        if p not in (1, 2):
            raise ValueError(f"magnitude importance takes p=1 or p=2, not {p}")
        self.p = p
        self.normalize = normalize

    def scores(
        self,
        target: CompileState | nn.Module,
        analysis: Analysis,
        batches: Iterable[Any] | None = None,
    ) -> dict[int, np.ndarray]:
        model, _, _ = resolve(target)
        out: dict[int, np.ndarray] = {}
        for g in analysis.prunable():
            member_scores = []
            for m, t in parameter_members(model, g):
                per_index = per_index_reduce(t, m.dim, "abs" if self.p == 1 else "sq")
                s = per_unit(g, m, per_index)
                member_scores.append(s if self.p == 1 else np.sqrt(s))
            out[g.id] = aggregate(member_scores, g.n_units, self.normalize)
        return out


@dataclass(frozen=True)
class MagnitudeOptions:
    p: int = 2
    normalize: bool = True


@register_pass
class MagnitudeImportancePass(ImportancePass):
    """``importance.magnitude{p=2}``: data-free weight-norm scores."""

    name: ClassVar[str] = "importance.magnitude"
    Options: ClassVar[type] = MagnitudeOptions

    def estimator(self) -> ImportanceEstimator:
        return MagnitudeImportance(self.options.p, self.options.normalize)
