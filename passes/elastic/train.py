"""Supernet training through ``DistillTrainer``: sandwich rule, in-place distillation, balancing.

Every optimisation step samples, *per batch* (ProARD samples once per epoch; we do not):

    S = [largest, smallest, c_1 .. c_k]           c_i uniform over the unlocked dims

(the sandwich rule, Yu & Huang 2019 / BigNAS). The largest subnet learns from the frozen teacher
(or the labels when there is none); the others learn from the largest's detached output — in-place
distillation — and each term is rescaled to the largest's magnitude (AmoebaLLM, arXiv 2411.10606):

    L = ℓ_full + Σ_i ℓ_i · ℓ_full.detach() / ℓ_i.detach()

Balancing is on by default only without a frozen teacher (the largest then learns from the labels,
a loss of real magnitude). When the supernet is the nested teacher itself, the largest subnet
starts *equal* to the teacher, ``ℓ_full ≈ 0``, and balancing would scale every other subnet's loss
to zero (measured on the digits CNN: the smallest subnet stayed at chance); then the terms are summed
unscaled. ``balance=True`` forces it.

Progressive unlocking (OFA, arXiv 1908.09791; ProARD, arXiv 2506.07666): the first third of the
steps samples widths only, the second adds depth, the last adds expansion ratios; locked dims stay
at full size. With ``loss="rslad"`` or ``"ard"`` every subnet term is adversarial (PGD on the
input of *that* subnet: the supernet's hooks keep the configuration active through the attack), so
each extracted subnet is robust (ProARD). The sampler is seeded by ``(seed, step)``: every DDP rank
draws the same subnets and a resumed run continues with the draws it would have made. Under a
wall-clock budget (``TrainConfig.time_budget_s``) the phases follow the larger of the steps' and the
budget's fraction done, so a run the budget stops still trains every phase; the phase of a step then
depends on each rank's clock near a phase boundary, and a resumed run, which gets its whole budget
again, starts its phases over.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from potstill.errors import InputError
from potstill.inputs.data import iter_batches
from potstill.passes.distill import DistillTrainer, StudentSpec, TrainConfig, TrainResult
from potstill.passes.distill.batches import count_batches
from torch import nn

from .space import PHASES, SubnetConfig
from .supernet import Supernet, recalibrate_bn


@dataclass(frozen=True)
class SandwichSampler:
    """``sample_students(step)`` for ``DistillTrainer``: the subnets of one step."""

    net: Supernet
    total_steps: int
    random_subnets: int = 2
    progressive: bool = True
    seed: int = 0
    #: the fraction of a wall-clock budget spent (``TimeBudget.fraction``), None without one: a run
    #: stopped by its budget would otherwise never reach the phases its planned steps put last
    spent: Callable[[], float] | None = None

    def unlocked(self, step: int) -> tuple[str, ...]:
        if not self.progressive:
            return PHASES
        phase = step * len(PHASES) // max(self.total_steps, 1)
        if self.spent is not None:
            phase = max(phase, int(self.spent() * len(PHASES)))
        phase = min(len(PHASES) - 1, phase)
        return PHASES[: phase + 1]

    def configs(self, step: int) -> list[SubnetConfig]:
        space = self.net.space
        rng = random.Random(self.seed * 1_000_003 + step)
        unlocked = self.unlocked(step)
        return [space.largest(), space.smallest(unlocked),
                *(space.sample(rng, unlocked) for _ in range(self.random_subnets))]

    def __call__(self, step: int) -> Sequence[StudentSpec]:
        names = ["largest", "smallest", *(f"random{i}" for i in range(self.random_subnets))]
        return [StudentSpec(self.net.model, cfg, 1.0, self.net.forward, name)
                for cfg, name in zip(self.configs(step), names)]


def train_supernet(
    net: Supernet,
    teacher: nn.Module | None,
    data: Any,
    config: TrainConfig | None = None,
    *,
    loss: str = "kd",
    random_subnets: int = 2,
    progressive: bool = True,
    balance: bool | None = None,
    **loss_options: Any,
) -> TrainResult:
    """Train every subnet of ``net`` at once (see the module docstring); returns the trainer's result.

    ``config`` is the distillation ``TrainConfig`` (epochs, lr, checkpoints, DDP, ...); in-place
    distillation is switched on here, balancing as ``balance`` says (None: only without a teacher,
    see the module docstring), and unused parameters allowed for DDP (a skipped block's weights get
    no gradient).
    """
    if random_subnets < 0:
        raise InputError(f"elastic training: random_subnets must be >= 0, got {random_subnets}")
    balance = teacher is None if balance is None else balance
    c = replace(config or TrainConfig(), inplace=True, balance=balance, find_unused_parameters=True)
    per_epoch = c.steps_per_epoch or count_batches(data, c.seed)
    total = min(c.max_steps or per_epoch * c.epochs, per_epoch * c.epochs)
    if not any(p.requires_grad for p in net.model.parameters()):
        net.model.requires_grad_(True)  # a supernet nested from a frozen teacher copy trains all of it
    largest = StudentSpec(net.model, net.space.largest(), 1.0, net.forward, "largest")
    trainer = DistillTrainer(largest, teacher, loss, c, **loss_options)
    spent = trainer.budget.fraction if c.time_budget_s is not None else None
    trainer.sample_students = SandwichSampler(net, total, random_subnets, progressive, c.seed, spent)
    with net.attached():
        return trainer.fit(data)


def evaluate_subnets(
    net: Supernet,
    configs: Iterable[SubnetConfig],
    data: Any,
    calib: Sequence[Any],
    *,
    pgd: Any = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Clean (and, with a ``PGDConfig``, robust) accuracy of each configuration's extracted subnet,
    after recalibrating BatchNorm for it on ``calib``."""
    from potstill.passes.distill.robust import robust_accuracy

    from .extract import extract

    out = []
    for cfg in configs:
        recalibrate_bn(net, cfg, calib)
        sub = extract(net, cfg).module
        if pgd is not None:
            acc = robust_accuracy(sub, data, pgd, limit)
        else:
            acc = {"clean_accuracy": _accuracy(sub, data, limit)}
        out.append({"config": cfg.to_dict(), **acc, "params": sum(p.numel() for p in sub.parameters())})
    return out


def _accuracy(model: nn.Module, data: Any, limit: int | None) -> float:
    import torch
    from potstill.inputs.data import primary_output

    correct = n = 0
    with torch.no_grad():
        for batch in iter_batches(data, limit):
            if batch.target is None:
                raise InputError("accuracy needs labelled batches")
            correct += int((primary_output(batch.run(model)).argmax(-1) == batch.target).sum())
            n += int(batch.target.numel())
    return correct / max(n, 1)
