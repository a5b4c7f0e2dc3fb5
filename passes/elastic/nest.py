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

Depth is nested by ranking each stage's blocks by Minitron's Block Importance
``1 − mean cos(h_in, h_out)`` (``passes/importance/blocks.py``): depth ``d`` keeps the ``d`` most
important blocks of the stage.
"""

from __future__ import annotations

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

    def to_dict(self) -> dict[str, Any]:
        return {"groups_permuted": len(self.orders), "block_order": {k: list(v) for k, v in self.block_order.items()}}


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


def rank_blocks(model: nn.Module, analysis: Analysis, batches: Sequence[Batch]) -> dict[str, list[str]]:
    """Each block container's blocks, most important first (Block Importance on ``batches``)."""
    from potstill.passes.importance.blocks import block_influence

    by_container: dict[str, list[str]] = {}
    for b in analysis.blocks:
        by_container.setdefault(b.container, []).append(b.name)
    by_container = {c: names for c, names in by_container.items() if len(names) > 1}
    if not by_container:
        return {}
    names = [n for ns in by_container.values() for n in ns]
    was = model.training
    model.eval()
    try:
        scores = block_influence(model, names, list(batches))
    finally:
        model.train(was)
    # ties (e.g. identical blocks) keep the later block last, as OFA drops the last blocks first
    return {c: sorted(ns, key=lambda n: (-scores[n], ns.index(n))) for c, ns in by_container.items()}
