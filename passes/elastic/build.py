"""``make_supernet``: nest a model in place and wrap it as a :class:`Supernet` (OFA channel sorting:
every width a prefix ordered by importance; blocks ranked for elastic depth when batches are given)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .nest import NestRecord, nest_widths, rank_blocks
from .space import build_space
from .supernet import Supernet

DEFAULT_RATIOS = (0.25, 0.5, 0.75, 1.0)


def make_supernet(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
    *,
    scores: Mapping[int, Any] | None = None,
    batches: Sequence[Any] | None = None,
    width_ratios: Sequence[float] = DEFAULT_RATIOS,
    expansion_ratios: Sequence[float] = DEFAULT_RATIOS,
    depth: bool = True,
    min_depth: int = 1,
    multiple: int = 8,
    analysis: Any = None,
) -> Supernet:
    """Nest ``model`` in place and return its supernet.

    ``scores``: unit scores per group id (default: L2 magnitude); ``batches``: calibration data for
    ranking blocks (depth is elastic only when given).
    """
    from potstill.inputs.data import as_batch
    from potstill.ir.capture import analyze

    a = analysis if analysis is not None else analyze(model, example_inputs, example_kwargs or {})
    if scores is None:
        from potstill.passes.importance.magnitude import MagnitudeImportance

        scores = MagnitudeImportance().scores(model, a)
    space = build_space(model, a, width_ratios=width_ratios, expansion_ratios=expansion_ratios, multiple=multiple)
    record = NestRecord(orders=nest_widths(model, a, scores, [d.group for d in space.width_dims]))
    if depth and batches:
        record.block_order = rank_blocks(model, a, [as_batch(b) for b in batches])
        space = build_space(model, a, width_ratios=width_ratios, expansion_ratios=expansion_ratios,
                            multiple=multiple, block_order=record.block_order, min_depth=min_depth)
    net = Supernet(model, a, space)
    net.record = record
    return net
