"""BatchNorm re-estimation (``bn.recalibrate``): fresh running statistics after pruning, no training.

Pruning changes what reaches every BatchNorm: fewer channels feed each convolution, so the mean and
variance a BN layer stored for the teacher no longer describe its input, and the normalised
activations drift layer after layer. Re-estimating them on unlabelled calibration data repairs
much of the damage without a gradient step. Each BN layer's statistics are reset and recomputed
with cumulative averaging (``momentum=None``) over the ``K`` calibration batches, in train mode for
the BN layers only (dropout and the rest stay in eval mode):

    running_mean = (1/K) sum_k mean_k(x),        running_var = (1/K) sum_k var_k(x)   (unbiased)

where ``mean_k`` / ``var_k`` are per-channel over batch ``k``'s samples and positions. Only
``running_mean``, ``running_var`` and ``num_batches_tracked`` change; weights, biases and every
other buffer stay bit-identical. A BN layer no batch reached keeps its old statistics.

Re-estimation is only as good as the calibration data is representative: on a few dozen crops of a
dozen photographs, re-estimating the *unpruned* EfficientNet-Lite0 teacher's statistics drops its
top-1 agreement with itself to 0.23 (measured here; the ImageNet statistics it was trained with are
not what 48 crops show). So the pass checks its work: with held-out batches (``state.heldout_data``,
never read for the statistics) it keeps the new statistics only when the student's held-out loss
against the teacher (``heldout.py``: KL of the logits, else relative error) does not rise, and
otherwise puts the old ones back and says so (``check=false`` keeps them unconditionally).

Sources: "adaptive BatchNorm" of EagleEye (Li et al., "EagleEye: Fast Sub-net Evaluation for
Efficient Neural Network Pruning", ECCV 2020) and NNCF's "BN adaptation" initialisation
(``nncf/torch/initialization.py``, ``DataLoaderBNAdaptationRunner``). The data is
``state.calib_data`` -- the calibration split, never the held-out split that measures fidelity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from potstill.errors import InputError
from potstill.inputs.data import iter_batches
from potstill.pipeline import Pass, PassResult, register_pass
from potstill.state import CompileState
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm
_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class BNRecalibrateOptions:
    #: calibration batches to average over (None: every batch of the calibration split)
    batches: int | None = None
    #: keep the new statistics only when the held-out loss does not rise (None: when held-out data exists)
    check: bool | None = None

    def __post_init__(self) -> None:
        if self.check is not None and not isinstance(self.check, bool):
            raise ValueError(f"check={self.check!r}: expected true or false")
        if self.batches is not None and (isinstance(self.batches, bool) or not isinstance(self.batches, int)
                                         or self.batches < 1):  # fmt: skip
            raise ValueError(f"batches={self.batches!r}: expected a whole number of batches >= 1")


def _note(message: str, loud: bool = False) -> None:
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if loud:
        console.print(f"[bold yellow]warning:[/] {message}")
    else:
        console.print(message, style="dim", markup=False, soft_wrap=True)


def batchnorms(model: nn.Module) -> dict[str, _BN]:
    """The BatchNorm layers of ``model`` that keep running statistics, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats}


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Callable[[], Iterable[Any]] | Iterable[Any], limit: int | None = None
) -> tuple[int, int]:
    """Re-estimate every BatchNorm's running statistics of ``model`` in place.

    Returns ``(batches used, BN layers updated)``. The model's train/eval modes and the BN layers'
    momenta are restored afterwards.
    """
    bns = batchnorms(model)
    if not bns:
        return 0, 0
    saved = {n: {k: getattr(m, k).clone() for k in _STATS} for n, m in bns.items()}
    for m in bns.values():  # write into copies of our own: a student may share them with the teacher (potstill.ir.cow)
        for k in _STATS:
            setattr(m, k, getattr(m, k).clone())
    modes = {m: m.training for m in model.modules()}
    momenta = {n: m.momentum for n, m in bns.items()}
    model.eval()
    for m in bns.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches, not an exponential one
        m.train()
    used = 0
    try:
        for batch in iter_batches(batches, limit):
            batch.run(model)
            used += 1
    except RuntimeError as e:
        for n, m in bns.items():
            for k, v in saved[n].items():
                getattr(m, k).copy_(v)
        raise InputError(
            f"bn.recalibrate: the calibration batches do not run through the student: {e}"
        ) from e
    finally:
        for n, m in bns.items():
            m.momentum = momenta[n]
        for module, training in modes.items():
            module.train(training)
    updated = 0
    for n, m in bns.items():
        if int(m.num_batches_tracked or 0) == 0:  # not reached by any batch: keep what it had
            for k, v in saved[n].items():
                getattr(m, k).copy_(v)
        else:
            updated += 1
    return used, updated


@register_pass
class BNRecalibratePass(Pass):
    """Re-estimate BatchNorm running statistics on the calibration split (no gradient steps)."""

    in_place = False  # owns the BatchNorm buffers it re-estimates (copies them first)

    name: ClassVar[str] = "bn.recalibrate"
    Options: ClassVar[type] = BNRecalibrateOptions

    def run(self, state: CompileState) -> PassResult:
        student = state.working()
        n_bn = len(batchnorms(student.module))
        if n_bn == 0:
            _note(f"bn.recalibrate: {student.name} has no BatchNorm layers; nothing to re-estimate")
            return PassResult(state, False)
        if state.calib_data is None:
            _note(
                f"bn.recalibrate: no calibration data, so the {n_bn} BatchNorm layers of {student.name} keep "
                "the teacher's statistics, which no longer fit the pruned channels; give --calib "
                "(a folder of images or FILE.py:FN) to re-estimate them",
                loud=True,
            )
            return PassResult(state, False)
        check = self.options.check
        if check and state.heldout_data is None:
            raise InputError("bn.recalibrate{check=true}: there are no held-out batches to check on; give --calib")
        reference = None
        record: dict[str, Any] = {}
        before = math.inf
        saved: dict[str, dict[str, torch.Tensor]] = {}
        if check is not False and state.heldout_data is not None:
            from .heldout import HeldoutReference, as_batches

            reference = HeldoutReference.of(state.teacher, as_batches(state.heldout_data()))
            before = reference.loss(student.module)
            saved = {n: {k: getattr(m, k).clone() for k in _STATS} for n, m in batchnorms(student.module).items()}
        used, updated = recalibrate_batchnorm(student.module, state.calib_data, self.options.batches)
        if reference is not None and used:
            after = reference.loss(student.module)
            record = {"heldout_loss_before": before, "heldout_loss_after": after, "kept": after <= before}
            if not after <= before:
                for n, m in batchnorms(student.module).items():
                    for k, v in saved[n].items():
                        setattr(m, k, v)
                _note(f"bn.recalibrate: re-estimated statistics raised the held-out loss of {student.name} "
                      f"({before:.4g} -> {after:.4g}); the previous statistics are kept")
                student.history.append("bn.recalibrate: statistics re-estimated, rejected on held-out data")
                student.metrics["bn_recalibrate"] = {"layers": 0, "of": n_bn, "batches": used, **record}
                return PassResult(state, False)
        if used == 0:
            _note(
                "bn.recalibrate: the calibration data yielded no batches; BatchNorm statistics unchanged",
                loud=True,
            )
            return PassResult(state, False)
        student.history.append(f"bn.recalibrate: {updated} of {n_bn} BatchNorm layers on {used} batches")
        student.metrics["bn_recalibrate"] = {"layers": updated, "of": n_bn, "batches": used}
        student.metrics["bn_recalibrate"].update(record)
        return PassResult(state, updated > 0)
