"""Kwon et al.'s mask search under a latency constraint: how many heads and neurons each layer keeps.

Kwon, Kim, Mahoney, Hassoun, Keutzer, Gholami, "A Fast Post-Training Pruning Framework for
Transformers" (NeurIPS 2022), §4.1 (Algorithm 1 and its latency variant). With the diagonal Fisher
``s(u)`` of each unit mask (``importance.fisher``: one loss scale for every group) and a latency
model per group ``lat_g(k) = c_g + a_g max(0, k - T_g)`` (``sublayer_latency.py``), the search
maximises the Fisher information kept,

    max  sum_g sum_{u in kept_g} s(u)    s.t.   sum_g lat_g(k_g) <= L,

in Kwon's form:

1. every group keeps its ``T_g`` best units (and at least its floor) for the constant ``c_g``;
2. the other units are ranked globally, per kind (heads with heads, neurons with neurons), in
   aligned chunks (``step`` units: a multiple of the profile's channel multiple) that cost
   ``a_g * step`` each;
3. for every number ``n`` of head chunks kept (best first), the rest of the budget buys the best
   neuron chunks that fit; the ``n`` with the most Fisher kept wins.

With one kind only the chunks are bought best-first until the budget is spent; with more than two
kinds, greedily by Fisher per millisecond. Which units (not how many) is then re-decided by the mask
rearrangement (``allocate.rearrange``) and the kept masks are tuned by least squares
(``reconstruct.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .align import unit_step
from .sublayer_latency import PiecewiseLatency

if TYPE_CHECKING:
    from potstill.ir.capture import CoupledGroup


@dataclass(frozen=True)
class SearchResult:
    """Kept units per group id, the predicted latency (ms) and the budget it was searched for."""

    keep: dict[int, int]
    predicted_ms: float
    full_ms: float
    budget_ms: float


def predict_ms(keep: Mapping[int, int], latency: Mapping[int, PiecewiseLatency]) -> float:
    """``sum_g lat_g(k_g)``: the predicted latency of the pruned layers."""
    return float(sum(latency[gid](k) for gid, k in keep.items()))


@dataclass(frozen=True)
class _Chunk:
    gid: int
    units: int
    score: float
    cost: float


def search_latency(
    groups: Sequence[CoupledGroup],
    scores: Mapping[int, np.ndarray],
    latency: Mapping[int, PiecewiseLatency],
    budget_ms: float,
    *,
    multiple: int,
    floor: float = 0.1,
) -> SearchResult:
    """Kept units per group whose predicted latency ``sum_g lat_g(k_g)`` is at most ``budget_ms``
    and whose kept Fisher is the largest the module docstring's search finds. When even every group
    at its base width misses the budget, the base widths are returned (the caller reports the miss)."""
    full = {g.id: g.n_units for g in groups}
    full_ms = predict_ms(full, latency)
    base: dict[int, int] = {}
    chunks: dict[str, list[_Chunk]] = {}
    for g in groups:
        step = unit_step(g.unit_channels, multiple)
        fn = latency[g.id]
        least = max(step, int(np.ceil(floor * g.n_units)), min(fn.threshold, g.n_units))
        least = min(g.n_units, -(-least // step) * step)
        base[g.id] = least
        s = np.sort(np.nan_to_num(np.asarray(scores[g.id], dtype=np.float64)))[::-1]
        rest = s[least:]
        for i in range(0, len(rest), step):
            piece = rest[i:i + step]
            chunks.setdefault(g.kind, []).append(_Chunk(g.id, len(piece), float(piece.sum()), fn.slope * len(piece)))
    spare = budget_ms - predict_ms(base, latency)
    if spare < 0:
        return SearchResult(base, predict_ms(base, latency), full_ms, budget_ms)
    bought = _buy(list(chunks.values()), spare)
    keep = dict(base)
    for c in bought:
        keep[c.gid] += c.units
    return SearchResult(keep, predict_ms(keep, latency), full_ms, budget_ms)


def _prefix(chunks: list[_Chunk]) -> tuple[list[_Chunk], np.ndarray, np.ndarray]:
    """Chunks best first (within a group always in score order: a group's chunks are bought as a
    prefix), with cumulative scores and costs."""
    ranked = sorted(chunks, key=lambda c: -c.score)
    scores = np.concatenate([[0.0], np.cumsum([c.score for c in ranked])])
    costs = np.concatenate([[0.0], np.cumsum([c.cost for c in ranked])])
    return ranked, scores, costs


def _buy(kinds: list[list[_Chunk]], spare: float) -> list[_Chunk]:
    """The chunks bought with ``spare`` ms (module docstring, step 3)."""
    if not kinds:
        return []
    if len(kinds) > 2:  # greedy by Fisher per ms
        ranked = sorted((c for k in kinds for c in k), key=lambda c: -c.score / max(c.cost, 1e-12))
        out, left = [], spare
        for c in ranked:
            if c.cost <= left:
                out.append(c)
                left -= c.cost
        return out
    first, s1, c1 = _prefix(kinds[0])
    second, s2, c2 = _prefix(kinds[1]) if len(kinds) == 2 else ([], np.zeros(1), np.zeros(1))
    best: tuple[float, int, int] | None = None
    for n in range(len(first) + 1):
        left = spare - c1[n]
        if left < -1e-12:
            break
        m = int(np.searchsorted(c2, left + 1e-12, side="right")) - 1
        total = float(s1[n] + s2[m])
        if best is None or total > best[0]:
            best = (total, n, m)
    assert best is not None  # n = 0 always fits (spare >= 0)
    return first[:best[1]] + second[:best[2]]
