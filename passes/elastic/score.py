"""How the elastic search scores a subnet: fidelity to the teacher (or the user's metric) on the
held-out batches, run in the supernet after BatchNorm re-estimation, with the weights that serve the
search (``Scorer.weights``: trained, before training, or the better of both, as ``keep`` ships them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from potstill.errors import InputError
from potstill.inputs.data import Batch, primary_output
from torch import nn

from .extract import extract
from .keep import trained_wins
from .space import SubnetConfig
from .supernet import Supernet, recalibrate_bn


def output_agreement(teacher_outputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """Top-1 agreement for logits (last dim > 1 and 2-D), else ``1 − ‖y − y_t‖ / ‖y_t‖``."""
    if all(t.dim() == 2 and t.shape[-1] > 1 for t in teacher_outputs):
        same = sum(int((t.argmax(-1) == s.argmax(-1)).sum()) for t, s in zip(teacher_outputs, outputs))
        return same / max(sum(t.shape[0] for t in teacher_outputs), 1)
    num = sum(float((t - s).float().pow(2).sum()) for t, s in zip(teacher_outputs, outputs))
    den = sum(float(t.float().pow(2).sum()) for t in teacher_outputs)
    return 1.0 - (num / den) ** 0.5 if den > 0 else float("nan")


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


def _fidelity_fn() -> Callable[..., Any] | None:
    try:
        from potstill.fidelity import measure_fidelity
    except ImportError:
        return None
    return measure_fidelity


@dataclass
class Scorer:
    """Accuracy of a configuration: ``metric(extracted)`` if given, else fidelity to the teacher on the
    held-out batches (``potstill.fidelity.measure_fidelity``; top-1 agreement / relative error where
    that module is absent)."""

    net: Supernet
    teacher: nn.Module
    heldout: list[Batch]
    calib: list[Batch]
    metric: Callable[[nn.Module], float] | None = None
    #: samples that re-estimate BatchNorm for each scored candidate (the finalists use every
    #: calibration batch); a few hundred estimate the statistics well (OFA uses 2,000 ImageNet images)
    bn_samples: int = 256
    #: the weights the search scores with (``_which_weights``): None until the first score, then
    #: ``trained``, ``untrained`` or ``both`` (the better of the two per configuration)
    weights: str | None = None
    _teacher_out: list[torch.Tensor] = field(default_factory=list)
    _bn_batches: list[Batch] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.heldout:
            raise InputError("elastic search needs held-out batches to score subnets")
        with torch.no_grad():
            self._teacher_out = [primary_output(b.run(self.teacher)).float() for b in self.heldout]
        seen = 0
        for b in self.calib:
            if seen >= self.bn_samples:
                break
            self._bn_batches.append(b)
            seen += b.size

    def score_module(self, module: nn.Module) -> float:
        """The same score for a standalone module (an extracted subnet)."""
        if self.metric is not None:
            return float(self.metric(module))
        measure = _fidelity_fn()
        if measure is not None:
            return float(measure(self.teacher, module, self.heldout).score)
        was = module.training
        module.eval()
        try:
            with torch.no_grad():
                outs = [primary_output(b.run(module)).float() for b in self.heldout]
        finally:
            module.train(was)
        return output_agreement(self._teacher_out, outs)

    def __call__(self, config: SubnetConfig) -> float:
        """The configuration's score with the weights that serve it best (``weights``): the trained
        ones, those before training, or the better of both, as ``settle_weights`` ships them."""
        if self.net.untrained is None or self.weights == "trained":
            return self._score(config)
        if self.weights is None:
            self.weights = self._which_weights()
        if self.weights == "untrained":
            with self.net.untrained_weights():
                return self._score(config)
        trained = self._score(config)
        with self.net.untrained_weights():
            untrained = self._score(config)
        return trained if trained_wins(trained, untrained) else untrained

    def _which_weights(self) -> str:
        """Which weights the search scores with, read off the largest, the middle (every choice at its
        median) and the smallest subnet: where one set wins at all three it serves the search;
        otherwise each subnet is scored with both.

        The sandwich rule trains the largest and the smallest subnet every step and the others now
        and then: on a pretrained teacher it can cost the subnets between what it gives the ends
        (EfficientNet-Lite0 at lr 1e-3 on 20 photos: the front within a 1.3x budget collapsed to the
        smallest subnet, though the trained weights won at both ends)."""
        space = self.net.space
        ends = [space.largest(), space.config([len(d.choices) // 2 for d in space.dims()]), space.smallest()]
        trained = [self._score(c) for c in ends]
        with self.net.untrained_weights():
            untrained = [self._score(c) for c in ends]
        wins = [trained_wins(t, u) for t, u in zip(trained, untrained, strict=True)]
        return "trained" if all(wins) else "untrained" if not any(wins) else "both"

    def _score(self, config: SubnetConfig) -> float:
        recalibrate_bn(self.net, config, self._bn_batches)
        if self.metric is not None:
            return float(self.metric(extract(self.net, config).module))
        was = self.net.model.training
        self.net.model.eval()
        try:
            measure = _fidelity_fn()
            if measure is not None:
                return float(measure(self.teacher, ConfiguredView(self.net, config), self.heldout).score)
            with torch.no_grad(), self.net.configured(config):
                outs = [primary_output(b.run(self.net.model)).float() for b in self.heldout]
        finally:
            self.net.model.train(was)
        return output_agreement(self._teacher_out, outs)


# ---------------------------------------------------------------------------------------------
# Search
