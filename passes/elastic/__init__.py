"""Elastic supernets: nest a teacher, train every subnet at once, search and extract students.

``make_supernet`` nests a model in place (``nest``) and returns a :class:`Supernet` that runs any
:class:`SubnetConfig` of its :class:`ElasticSpace` (``supernet``); ``train_supernet`` trains it
through ``DistillTrainer`` with the sandwich rule (``train``); ``extract`` slices a configuration
into a standalone module (``extract``); ``search`` finds the Pareto front under a profile's
budgets (``search``). The passes are ``elastic.nest``, ``elastic.train`` and ``elastic.search``.

    >>> net = make_supernet(model, (x,), batches=calib)           # doctest: +SKIP
    >>> train_supernet(net, teacher, data, ElasticTrainConfig())  # doctest: +SKIP
    >>> student = extract(net, net.space.smallest()).module       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .extract import Extracted, extract
from .nest import NestRecord, nest_widths, permute_group, rank_blocks
from .space import PHASES, DepthDim, ElasticSpace, SubnetConfig, WidthDim, build_space
from .supernet import Supernet, recalibrate_bn

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


__all__ = [
    "DEFAULT_RATIOS",
    "PHASES",
    "DepthDim",
    "ElasticSpace",
    "Extracted",
    "NestRecord",
    "SubnetConfig",
    "Supernet",
    "WidthDim",
    "build_space",
    "extract",
    "make_supernet",
    "nest_widths",
    "permute_group",
    "rank_blocks",
    "recalibrate_bn",
]
