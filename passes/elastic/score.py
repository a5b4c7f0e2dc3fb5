"""How the elastic search scores a subnet: fidelity to the teacher (or the user's metric) on the
held-out batches, run in the supernet, with the weights and BatchNorm statistics that serve it.

A subnet's *source* is which weights it runs (trained, or those before training) and which
BatchNorm statistics: re-estimated for the subnet on the calibration batches (OFA, EagleEye), or
the stored ones the weights carry, sliced to the kept channels. Re-estimation is what a subnet of a
supernet trained from scratch needs; on a pretrained teacher and a few photos it is what breaks it:
re-estimated on 32 photo crops, the unpruned EfficientNet-Lite0 agreed with itself on 0.28 of 32
held-out crops (1.0 with its stored statistics), every subnet scored near zero and the front
collapsed to one point. ``Scorer.sources`` are read off three probe subnets (``_which_sources``),
and ``keep`` ships each finalist from the source that scores best for it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from potstill.errors import InputError
from potstill.fidelity import infer_task, measure_fidelity, reference_output
from potstill.inputs.data import Batch
from torch import nn

from .extract import extract
from .space import SubnetConfig
from .supernet import Supernet, batchnorm_stats, recalibrate_bn, restore_stats


@dataclass(frozen=True)
class Source:
    """Where a scored subnet's weights (``trained`` | ``untrained``) and BatchNorm statistics
    (``recalibrated`` | ``stored``) come from."""

    weights: str = "trained"
    stats: str = "recalibrated"

    def label(self, batchnorm: bool = True) -> str:
        """How the record and the console name it (``batchnorm``: whether the model has BatchNorm)."""
        return f"{self.weights} weights, {self.stats} BN statistics" if batchnorm else f"{self.weights} weights"


#: ties go to the earlier source: trained weights before untrained ones, re-estimated
#: statistics before stored ones (the rule a supernet trained from scratch needs)
SOURCE_ORDER = (Source("trained", "recalibrated"), Source("trained", "stored"),
                Source("untrained", "recalibrated"), Source("untrained", "stored"))


def better(a: float, b: float) -> bool:
    """Whether score ``a`` beats ``b`` strictly (a non-finite score loses to a finite one)."""
    return math.isfinite(a) and (not math.isfinite(b) or a > b)


class ConfiguredView(nn.Module):
    """The supernet running as one configuration, as a module (no weights copied)."""

    def __init__(self, net: Supernet, config: SubnetConfig) -> None:
        super().__init__()
        # a plain attribute (Supernet is no Module): the view registers none of the weights
        self.supernet = net
        self.config = config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.supernet.configured(self.config):
            return self.supernet.model(*args, **kwargs)


@dataclass
class Scorer:
    """Accuracy of a configuration: ``metric(extracted)`` if given, else fidelity to the teacher on the
    held-out batches (``potstill.fidelity.measure_fidelity`` against the teacher's outputs, computed
    once), from the sources that serve the search (``sources``)."""

    net: Supernet
    teacher: nn.Module
    heldout: list[Batch]
    calib: list[Batch]
    metric: Callable[[nn.Module], float] | None = None
    #: samples that re-estimate BatchNorm for each scored candidate (the finalists use every
    #: calibration batch); a few hundred estimate the statistics well (OFA uses 2,000 ImageNet images)
    bn_samples: int = 256
    #: the sources the search scores with (``_which_sources``), best of them per configuration: None
    #: until the first score
    sources: tuple[Source, ...] | None = None
    #: the teacher's outputs as ``measure_fidelity`` reads them (``reference_output``) and their task:
    #: each candidate then runs only the subnet, not the teacher again
    _teacher_ref: list[Any] = field(default_factory=list)
    _task: str | None = None
    _bn_batches: list[Batch] = field(default_factory=list)
    #: the trained weights' BatchNorm statistics as the search found them (re-estimation overwrites them)
    _stored: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.heldout:
            raise InputError("elastic search needs held-out batches to score subnets")
        was = self.teacher.training
        self.teacher.eval()
        try:
            with torch.no_grad():
                for b in self.heldout:
                    out = b.run(self.teacher)
                    self._task = self._task or infer_task(self.teacher, None, out)
                    self._teacher_ref.append(reference_output(out))
        finally:
            self.teacher.train(was)
        seen = 0
        for b in self.calib:
            if seen >= self.bn_samples:
                break
            self._bn_batches.append(b)
            seen += b.size
        self._stored = batchnorm_stats(self.net.model)

    def label(self, source: Source) -> str:
        return source.label(bool(self._stored))

    def candidates(self) -> tuple[Source, ...]:
        """Every source this supernet offers: the weights before training where it keeps them, stored
        statistics where it has BatchNorm, in ``SOURCE_ORDER``."""
        return tuple(s for s in SOURCE_ORDER if (s.weights == "trained" or self.net.untrained is not None)
                     and (s.stats == "recalibrated" or self._stored))

    @contextlib.contextmanager
    def prepared(self, config: SubnetConfig, source: Source, batches: Sequence[Any] | None = None) -> Iterator[None]:
        """The supernet with ``source``'s weights and statistics for ``config`` inside the block (the
        trained weights after; their statistics are whatever the last re-estimation left)."""
        weights = self.net.untrained_weights() if source.weights == "untrained" else contextlib.nullcontext()
        with weights:
            if source.stats == "recalibrated":
                recalibrate_bn(self.net, config, self._bn_batches if batches is None else batches)
            elif source.weights == "trained":  # the untrained copy brings its own statistics
                restore_stats(self.net.model, self._stored)
            yield

    def score_module(self, module: nn.Module) -> float:
        """The same score for a standalone module (an extracted subnet)."""
        if self.metric is not None:
            return float(self.metric(module))
        return float(measure_fidelity(self._teacher_ref, module, self.heldout, self._task).score)

    def __call__(self, config: SubnetConfig) -> float:
        """The configuration's score from the sources that serve the search, the best of them."""
        if self.sources is None:
            offered = self.candidates()
            self.sources = offered if len(offered) == 1 else self._which_sources(offered)
        return best_of([(s, self._score(config, s)) for s in self.sources])[1]

    def _which_sources(self, offered: tuple[Source, ...]) -> tuple[Source, ...]:
        """The sources the search scores with, read off the largest, the middle (every choice at its
        median) and the smallest subnet: each source that is best at one of them at least.

        The sandwich rule trains the largest and the smallest subnet every step and the others now
        and then: on a pretrained teacher it can cost the subnets between what it gives the ends, so
        the middle is probed too; and re-estimated statistics can ruin a pretrained teacher's
        subnets where the calibration data is a few photos (the module docstring)."""
        space = self.net.space
        probes = [space.largest(), space.config([len(d.choices) // 2 for d in space.dims()]), space.smallest()]
        winners = {best_of([(s, self._score(c, s)) for s in offered])[0] for c in probes}
        return tuple(s for s in offered if s in winners)

    def _score(self, config: SubnetConfig, source: Source = SOURCE_ORDER[0]) -> float:
        with self.prepared(config, source):
            if self.metric is not None:
                return float(self.metric(extract(self.net, config).module))
            was = self.net.model.training
            self.net.model.eval()  # the view holds no submodules: measure_fidelity's eval() does not reach them
            try:
                return float(measure_fidelity(self._teacher_ref, ConfiguredView(self.net, config), self.heldout,
                                              self._task).score)
            finally:
                self.net.model.train(was)


def best_of(scored: Sequence[tuple[Source, float]]) -> tuple[Source, float]:
    """The best-scoring ``(source, score)``; ties go to the earlier one."""
    best = scored[0]
    for item in scored[1:]:
        if better(item[1], best[1]):
            best = item
    return best
