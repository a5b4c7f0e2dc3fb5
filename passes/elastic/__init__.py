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

from .build import DEFAULT_RATIOS, make_supernet
from .extract import Extracted, extract
from .nest import NestRecord, nest_widths, permute_group, rank_blocks
from .space import PHASES, DepthDim, ElasticSpace, SubnetConfig, WidthDim, build_space
from .supernet import Supernet, recalibrate_bn

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
