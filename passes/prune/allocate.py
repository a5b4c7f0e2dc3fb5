"""Global allocation: how many units each coupled group keeps under one MACs (or latency) budget.

Every unit ``u`` of group ``g`` gets a density, its importance per unit of cost saved,

    d(u) = s~_g(u) / c_g,        c_g = C(full) - C(full with g one unit smaller)

where ``C`` is the predicted MACs (or latency from the profile's table) and ``s~`` the score, when
the estimator's scores share one scale across groups (a loss change: Fisher). Scores on no common
scale (magnitude, activation, Taylor, OBS) are divided by their group's mean instead and *not* by
the cost: with every group's mean at 1, dividing by cost would cut the costliest groups to their
floor whatever the data say; ranked by relative score alone, a group loses more when its units'
scores are more uneven. Units are removed in ascending
density, globally, after setting aside each group's floor (its ``floor`` fraction, at least one
aligned step); each group's count is rounded to the channel multiple; the number of units removed is
found by bisection so that the predicted cost meets the budget. This is Kwon et al. 2022's mask
search (Algorithm 1: heads and neurons ranked globally by Fisher under a FLOPs constraint) in its
knapsack form -- greedy by value per cost -- for any mix of groups (ResNet channels, inverted-residual
expansions, heads, FFN neurons).

``rearrange`` is Kwon et al.'s mask rearrangement (§4.2): with a group's per-sample mask gradients
``g_b`` (``importance.fisher``), the loss of dropping the set ``P`` is ``||sum_{i in P} v_i||^2``
with ``v_i = (g_b(i))_b``, which the diagonal ignores. For a fixed count, start from the lowest
diagonal and, adding the next candidate, drop from ``P`` the unit whose removal leaves the smallest
loss (greedy, ``O(n)`` per step using the Gram matrix ``M = V V^T``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .align import align_units, unit_step

if TYPE_CHECKING:
    from potstill.ir.capture import CoupledGroup

Measure = Callable[[Mapping[int, int]], float]


@dataclass(frozen=True)
class Allocation:
    """Kept units per group id, the predicted cost and the budget it was searched for."""

    keep: dict[int, int]
    cost: float
    full: float
    budget: float
    #: units removed in density order before alignment (the bisection variable)
    removed: int


def unit_costs(groups: Sequence[CoupledGroup], measure: Measure) -> dict[int, float]:
    """Cost saved by removing one unit of each group (``c_g``), at full width."""
    full = {g.id: g.n_units for g in groups}
    base = measure(full)
    tiny = max(abs(base), 1.0) * 1e-12
    return {g.id: max(base - measure({**full, g.id: g.n_units - 1}), tiny) for g in groups}


def densities(groups: Sequence[CoupledGroup], scores: Mapping[int, np.ndarray], costs: Mapping[int, float],
              comparable: bool) -> dict[int, np.ndarray]:
    """``d(u)`` per unit (see the module docstring)."""
    mean_cost = float(np.mean(list(costs.values()))) or 1.0
    out = {}
    for g in groups:
        s = np.asarray(scores[g.id], dtype=np.float64)
        s = np.where(np.isfinite(s), s, 0.0)
        if comparable:
            out[g.id] = s / (costs[g.id] / mean_cost)
        else:
            m = float(np.mean(s))
            out[g.id] = s / m if m > 0 else np.ones_like(s)
    return out


def allocate(
    groups: Sequence[CoupledGroup],
    scores: Mapping[int, np.ndarray],
    measure: Measure,
    budget: float,
    *,
    multiple: int,
    comparable: bool,
    floor: float = 0.1,
    uniform: bool = False,
    best_effort: bool = False,
) -> Allocation:
    """The fewest removals (in density order) whose aligned widths meet ``measure(keep) <= budget``.

    When even every group at its floor misses the budget: raises ``ValueError``, or with
    ``best_effort`` returns those narrowest widths (the caller reports the miss).
    """
    full = {g.id: g.n_units for g in groups}
    full_cost = measure(full)
    costs = unit_costs(groups, measure)
    dens = densities(groups, scores, costs, comparable)
    floors = {g.id: max(unit_step(g.unit_channels, multiple), int(np.ceil(floor * g.n_units))) for g in groups}
    entries: list[tuple[float, int]] = []
    for g in groups:
        order = np.sort(dens[g.id])
        removable = max(0, g.n_units - min(floors[g.id], g.n_units))
        entries += [(float(d), g.id) for d in order[:removable]]
    entries.sort(key=lambda e: e[0])
    ids = np.array([gid for _, gid in entries], dtype=np.int64)

    def counts(m: int) -> dict[int, int]:
        removed = {g.id: 0 for g in groups}
        if m > 0:
            got, n = np.unique(ids[:m], return_counts=True)
            removed.update({int(a): int(b) for a, b in zip(got, n, strict=True)})
        keep = {g.id: g.n_units - removed[g.id] for g in groups}
        if uniform:
            by_shape: dict[tuple[str, int], list[int]] = {}
            for g in groups:
                by_shape.setdefault((g.kind, g.n_units), []).append(g.id)
            for gids in by_shape.values():
                mean = float(np.mean([keep[i] for i in gids]))
                keep.update({i: round(mean) for i in gids})
        by_id = {g.id: g for g in groups}
        return {gid: align_units(k, by_id[gid].n_units, by_id[gid].unit_channels, multiple)
                for gid, k in keep.items()}

    lo, hi = 0, len(entries)
    if measure(counts(hi)) > budget:
        if best_effort:
            keep = counts(hi)
            return Allocation(keep, measure(keep), full_cost, budget, hi)
        raise ValueError(f"even the narrowest widths cost {measure(counts(hi)):.4g} > budget {budget:.4g}")
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(counts(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    keep = counts(lo)
    return Allocation(keep, measure(keep), full_cost, budget, lo)


def rearrange(grads: np.ndarray, n_keep: int) -> list[int]:
    """Units to keep (sorted) for a fixed count, by Kwon et al.'s greedy mask rearrangement.

    ``grads`` is ``[samples, units]`` (per-sample mask gradients). The dropped set ``P`` minimises,
    greedily, ``||sum_{i in P} v_i||^2`` (``v_i`` = column ``i``).
    """
    n = grads.shape[1]
    n_drop = n - n_keep
    if n_drop <= 0 or n_keep <= 0:
        return list(range(n)) if n_drop <= 0 else []
    v = grads.astype(np.float64)
    gram = v.T @ v
    order = list(np.argsort(np.diag(gram), kind="stable"))
    dropped = list(order[:n_drop])
    in_p = np.zeros(n, dtype=bool)
    in_p[dropped] = True
    t = gram[:, dropped].sum(1)  # t_j = sum_{i in P} M_ij
    for idx in order[n_drop:]:
        in_p[idx] = True
        t += gram[:, idx]
        total = float(t[in_p].sum())  # ||sum_P v||^2
        members = np.flatnonzero(in_p)
        left = total - 2 * t[members] + np.diag(gram)[members]  # ||sum_P v - v_j||^2
        j = int(members[int(np.argmin(left))])
        in_p[j] = False
        t -= gram[:, j]
    return sorted(int(i) for i in np.flatnonzero(~in_p))


def lower_hull(points: Sequence[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The lower convex hull of ``(saved, loss, width)`` points from ``(0, 0, full)``, by ascending
    ``saved``: the widths worth buying, each at a higher loss per cost than the one before."""
    pts = sorted(points, key=lambda p: (p[0], p[1]))
    hull: list[tuple[float, float, int]] = []
    for p in pts:
        if hull and p[0] <= hull[-1][0]:
            continue  # saves no more than a cheaper-to-lose option already kept
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def hull_steps(curves: Mapping[int, Sequence[tuple[int, float, float]]]) -> tuple[dict[int, int], list[tuple[float, int, int, float]]]:
    """Each group's full width, and the steps along every group's lower convex hull of
    ``(saved, loss)`` as ``(d loss / d saved, group, width, saved by the step)``, cheapest first."""
    keep: dict[int, int] = {}
    steps: list[tuple[float, int, int, float]] = []
    for gid, options in curves.items():
        full = max(options, key=lambda o: o[0])
        keep[gid] = full[0]
        hull = lower_hull([(s, loss, w) for w, loss, s in options])
        for (x0, y0, _), (x1, y1, w1) in itertools.pairwise(hull):
            steps.append(((y1 - y0) / (x1 - x0), gid, w1, x1 - x0))
    steps.sort(key=lambda s: (s[0], s[1]))
    return keep, steps


def sensitivity_allocate(curves: Mapping[int, Sequence[tuple[int, float, float]]], needed: float) -> dict[int, int]:
    """Kept width per group, buying cost savings by the least loss per unit saved (NetAdapt / AMC).

    ``curves[g]`` lists ``(width, loss, saved)`` for each candidate width of group ``g`` (the full
    width with ``loss = saved = 0`` included); losses and savings add across groups. Steps along each
    group's lower convex hull are taken in ascending ``d loss / d saved`` until ``needed`` is saved
    (all of them when it cannot be): a multiple-choice knapsack solved greedily on its hulls.

    >>> sensitivity_allocate({0: [(8, 0, 0), (4, 1.0, 10)], 1: [(8, 0, 0), (4, 5.0, 10)]}, 10)
    {0: 4, 1: 8}
    """
    keep, steps = hull_steps(curves)
    saved = 0.0
    for _, gid, width, gain in steps:
        if saved >= needed:
            break
        keep[gid] = width
        saved += gain
    return keep
