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
from potstill.errors import InputError
from potstill.state import CompileState
from torch import nn

from .base import (
    ImportanceEstimator,
    aggregate,
    estimator,
    parameter_members,
    per_index_reduce,
    per_unit,
    resolve,
)

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis


@estimator
@dataclass(frozen=True)
class MagnitudeImportance(ImportanceEstimator):
    """``importance.magnitude{p=2}``: L1 (``p=1``) or L2 (``p=2``) norm of each unit's weights,
    summed over the group (data-free)."""

    name: ClassVar[str] = "magnitude"
    data_driven: ClassVar[bool] = False

    p: int = 2
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.p not in (1, 2):
            raise InputError(f"importance.magnitude: p must be 1 or 2, not {self.p!r}")

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
