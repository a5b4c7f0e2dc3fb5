"""Nesting: permute every elastic group's units by importance so that every width is a prefix.

For a coupled group with unit scores ``s`` (higher = keep) let ``π = argsort(-s)``. Each member
slice (producer rows, norm affine and statistics, consumer columns; ``potstill.ir.capture.Member``) is
re-indexed by the same ``π``. A permutation applied consistently to a producer's outputs and to
every consumer's inputs (and to the per-channel parameters between them) leaves the function
unchanged — ``W₂ P^T · P W₁ x = W₂ W₁ x`` — so the full network computes what it did, while the
``k`` most important units of every group are now ``0..k-1`` (OFA's channel sorting,
arXiv 1908.09791 §3.2; Minitron/Nemotron Elastic's nested sub-networks, arXiv 2511.16664).
LayerNorm/RMSNorm over a permuted hidden dim are invariant too: the mean and variance do not
depend on the order. Pinned groups are left alone.

Depth is nested by ranking each stage's blocks so that depth ``d`` keeps the ``d`` blocks whose
removal the output minds least, greedily: drop the block whose removal (with those dropped before)
keeps the highest fidelity to the full network on the calibration batches, re-score, repeat
(the iterative, output-measured ranking of ShortGPT-style depth pruning, on the search's own
objective). A stage of more than ``GREEDY_MAX_BLOCKS`` blocks (``n(n-1)/2`` evaluations) is ranked
by Minitron's Block Importance ``1 − mean cos(h_in, h_out)`` instead (``passes/importance/blocks.py``).
Measured on all-MiniLM-L6-v2 before any training, held-out cosine of the full-width subnet at
depth 3 / 4 / 5: 0.736 / 0.853 / 0.940 greedy, 0.621 / 0.843 / 0.940 by Block Importance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from potstill.ir.surgery import _get_tensor
from torch import nn

if TYPE_CHECKING:
    from potstill.inputs.data import Batch
    from potstill.ir.capture import Analysis, CoupledGroup


@dataclass
class NestRecord:
    """What nesting did: the unit order applied to each group (``order[i]`` = old index of new unit i)."""

    orders: dict[int, list[int]] = field(default_factory=dict)
    block_order: dict[str, list[str]] = field(default_factory=dict)
    #: which estimator's scores ordered the units, with every candidate's probe fidelity
    #: (``build.choose_scores``); None when the scores were given or magnitude was the only choice
    importance: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"groups_permuted": len(self.orders), "block_order": {k: list(v) for k, v in self.block_order.items()}}
        return out | ({"importance": self.importance} if self.importance is not None else {})


def permute_group(model: nn.Module, group: CoupledGroup, order: Sequence[int]) -> None:
    """Re-index every member slice of ``group`` in place: new unit ``i`` is old unit ``order[i]``."""
    if sorted(order) != list(range(group.n_units)):
        raise ValueError(f"{group.describe()}: order must be a permutation of 0..{group.n_units - 1}")
    seen: set[tuple[int, int, int]] = set()
    for m in group.members:
        t = _get_tensor(model, m.param)
        key = (id(t), m.dim, m.offset)
        if key in seen:
            continue  # a tied tensor listed under two names
        seen.add(key)
        idx = torch.arange(t.shape[m.dim], device=t.device)
        new_positions = torch.tensor(group.positions(m, list(range(group.n_units))), device=t.device)
        # positions() sorts the units it is given, so build the permuted index unit by unit
        old_positions = torch.cat([torch.tensor(group.positions(m, [u]), device=t.device) for u in order])
        idx[new_positions] = old_positions
        with torch.no_grad():
            t.data = t.data.index_select(m.dim, idx).contiguous()


def nest_widths(
    model: nn.Module, analysis: Analysis, scores: Mapping[int, Any], groups: Sequence[int] | None = None
) -> dict[int, list[int]]:
    """Permute each group (all scored, unpinned groups, or ``groups``) by descending score."""
    orders: dict[int, list[int]] = {}
    for g in analysis.groups:
        if g.pinned is not None or g.id not in scores or (groups is not None and g.id not in groups):
            continue
        s = np.asarray(scores[g.id], dtype=np.float64)
        if s.shape != (g.n_units,):
            raise ValueError(f"{g.describe()}: {s.size} scores for {g.n_units} units")
        # stable sort: equal scores keep their order, so a nested model nests again as the identity
        order = [int(i) for i in np.argsort(-s, kind="stable")]
        if order != list(range(g.n_units)):
            permute_group(model, g, order)
        orders[g.id] = order
    return orders


#: the largest stage ranked by greedy, measured removal; larger ones use Block Importance
GREEDY_MAX_BLOCKS = 12
#: calibration batches the greedy ranking measures on
RANK_BATCHES = 8


def rank_blocks(model: nn.Module, analysis: Analysis, batches: Sequence[Batch]) -> dict[str, list[str]]:
    """Each block container's blocks, most important first (see the module docstring)."""
    from potstill.passes.importance.blocks import block_influence

    by_container: dict[str, list[str]] = {}
    for b in analysis.blocks:
        by_container.setdefault(b.container, []).append(b.name)
    by_container = {c: names for c, names in by_container.items() if len(names) > 1}
    if not by_container:
        return {}
    was = model.training
    model.eval()
    try:
        large = [n for ns in by_container.values() if len(ns) > GREEDY_MAX_BLOCKS for n in ns]
        scores = block_influence(model, large, list(batches)) if large else {}
        out = {}
        for c, ns in by_container.items():
            if len(ns) > GREEDY_MAX_BLOCKS:
                # ties (e.g. identical blocks) keep the later block last, as OFA drops the last blocks first
                out[c] = sorted(ns, key=lambda n: (-scores[n], ns.index(n)))
            else:
                out[c] = greedy_block_order(model, ns, list(batches)[:RANK_BATCHES])
    finally:
        model.train(was)
    return out


def greedy_block_order(model: nn.Module, names: Sequence[str], batches: Sequence[Batch]) -> list[str]:
    """``names`` most important first: repeatedly drop the block whose removal keeps the highest
    fidelity to ``model``'s own outputs (ties: the later block goes first)."""
    from potstill.fidelity import measure_fidelity
    from potstill.inputs.data import as_batch
    from potstill.passes.importance.blocks import skipped

    batches = [as_batch(b) for b in batches]
    with torch.no_grad():
        reference = [b.run(model) for b in batches]
    left, dropped = list(names), list[str]()
    while len(left) > 1:
        def kept(name: str) -> tuple[float, int]:
            with skipped(model, [*dropped, name]):
                score = measure_fidelity(reference, model, batches).score
            return (score if math.isfinite(score) else -1.0, names.index(name))  # NaN ranks last

        best = max(left, key=kept)
        dropped.append(best)
        left.remove(best)
    return [*left, *reversed(dropped)]
