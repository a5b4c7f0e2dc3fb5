"""Widths by measured sensitivity: each group's held-out loss as a function of its width (NetAdapt, AMC).

The global allocation (``allocate.py``) ranks units by an estimator's score per unit of cost, a
first-order guess of what removing them costs. Where a model is cheap to run, the loss itself can be
measured instead. For every prunable group ``g`` and a few aligned widths ``k`` (from the full width
down to the floor), the model with *only* ``g`` pruned to its ``k`` best units and its consumers
refitted (``reconstruct.py``, as the final student will be) is scored on the held-out batches
(``heldout.py``: KL to the source for logits). That gives a curve ``(k, loss, cost saved)`` per
group. Widths are then bought along each curve's lower convex hull in ascending loss per unit of
cost saved until the whole allocation meets the budget (``allocate.hull_steps``): NetAdapt's per-layer
empirical measurements (Yang et al., ECCV 2018) and AMC's accuracy-per-FLOP sensitivity (He et al.,
ECCV 2018), solved as a multiple-choice knapsack instead of by one greedy step per iteration.

Losses measured one group at a time do not add exactly when every group is pruned at once, so the
pass compares this allocation with the score-based global one on the same held-out batches and keeps
the closer student (``width.py``, ``metrics["prune"]["estimators"]``).

Cost: ``groups x widths`` prunings, refits and held-out passes (at most ``MAX_TRIALS``: a model with
many groups measures fewer widths each), so ``allocation=auto`` uses it only below
``width.CHEAP_MACS`` per forward pass; ``allocation=sensitivity`` asks for it on any model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from potstill.inputs.data import Batch
from torch import nn

from .align import unit_step
from .allocate import hull_steps
from .heldout import HeldoutReference

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis, CoupledGroup

#: candidate widths measured per group (the full width aside): enough for a convex hull with a few
#: corners, few enough that a ten-group CNN costs about eighty small prunings
WIDTHS_PER_GROUP = 8
#: prunings measured in all: a model with many groups measures fewer widths per group (at least 2)
MAX_TRIALS = 96


def widths_per_group(n_groups: int) -> int:
    """How many widths each of ``n_groups`` groups measures within ``MAX_TRIALS``.

    >>> widths_per_group(10), widths_per_group(24), widths_per_group(100)
    (8, 4, 2)
    """
    return max(2, min(WIDTHS_PER_GROUP, MAX_TRIALS // max(n_groups, 1)))


def candidate_widths(n: int, step: int, floor: float, most: int = WIDTHS_PER_GROUP) -> list[int]:
    """Aligned widths below ``n`` down to ``floor * n`` (at least one step), at most ``most`` of
    them, evenly spread and always including the narrowest; descending.

    >>> candidate_widths(64, 8, 0.1)
    [56, 48, 40, 32, 24, 16, 8]
    >>> candidate_widths(32, 1, 0.25)
    [29, 26, 23, 20, 17, 14, 11, 8]
    """
    low = max(step, int(np.ceil(floor * n / step)) * step)
    widths = list(range(low, n, step))
    if len(widths) > most:
        stride = int(np.ceil(len(widths) / most))
        widths = sorted({*widths[::-1][stride - 1::stride], low})
        if len(widths) > most:  # the narrowest stays: drop the one above it
            widths = [widths[0], *widths[2:]]
    return sorted(widths, reverse=True)


@dataclass
class SensitivityPlan:
    """Kept units per group, and per group the measured curve for the manifest."""

    keep: dict[int, int]
    curves: dict[int, list[tuple[int, float, float]]] = field(default_factory=dict)

    def record(self, labels: Mapping[int, str]) -> list[dict[str, object]]:
        return [{"group": labels.get(g, str(g)), "units": self.keep[g],
                 "loss": {k: round(loss, 6) for k, loss, _ in curve}} for g, curve in self.curves.items()]


def plan_sensitivity(model: nn.Module, analysis: Analysis, groups: Sequence[CoupledGroup],
                     scores: Mapping[int, np.ndarray], heldout: Sequence[Batch],
                     measure: Callable[[Mapping[int, int]], float], limit: float, multiple: int,
                     floor: float, refit: Callable[[nn.Module, nn.Module, dict[int, list[int]]], None]) -> SensitivityPlan:  # fmt: skip
    """Measure each group's curve and allocate widths under ``measure(keep) <= limit`` (module
    docstring). ``refit(source, pruned, keep)`` repairs a pruned copy in place as the pass will."""
    from potstill.ir.surgery import keep_top, prune_width

    ref = HeldoutReference.of(model, heldout)
    full = {g.id: g.n_units for g in groups}
    base = measure(full)
    curves: dict[int, list[tuple[int, float, float]]] = {}
    most = widths_per_group(len(groups))
    for g in groups:
        step = unit_step(g.unit_channels, multiple)
        curve = [(g.n_units, 0.0, 0.0)]
        for k in candidate_widths(g.n_units, step, floor, most):
            keep = {g.id: keep_top(g, scores[g.id], k)}
            pruned = prune_width(model, analysis, keep)
            refit(model, pruned, keep)
            loss = ref.loss(pruned)
            if np.isfinite(loss):  # a width that breaks the model is not an option
                curve.append((k, loss, base - measure({**full, g.id: k})))
        curves[g.id] = curve
    # savings measured one group at a time overstate the joint saving where groups meet in one layer
    # (a conv's MACs are its input times its output channels): take hull steps until the whole
    # allocation meets the budget by the cost model, not by the sum of the parts
    keep, steps = hull_steps(curves)
    for _, gid, width, _gain in steps:
        if measure(keep) <= limit:
            break
        keep[gid] = width
    return SensitivityPlan(keep, curves)
