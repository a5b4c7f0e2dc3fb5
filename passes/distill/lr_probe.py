"""Choose the learning rate by a short held-out probe, then train on from the winner.

No one learning rate suits every pruned pretrained student: five minutes of MiniLM distillation at
lr 2e-4 raised the held-out loss of a lightly pruned student (``--ratio 0.1``) that 5e-5 lowered,
while at ``--ratio 0.35`` 2e-4 did best. So, given candidates ``η_1..η_k`` (the default pipeline's
for a pretrained teacher: its task's lr, a quarter and a sixteenth of it), each trains ``n`` steps
from the same start ``θ_0`` at a constant rate, and the held-out loss ``L_h`` (the one the
``check`` of the distill pass keeps or rejects training by, on batches never trained on) decides:

    η* = argmin_i L_h(θ_i),    θ_i = θ_0 after n steps at η_i

Where the smallest candidate does as well as any and still ends above the loss before training
(every rate tried made the student worse, or all diverged), the probe goes down the ladder: a rung a quarter of the last, at most
``EXTRA_RUNGS`` times, each run for the same steps, until a rung lowers the loss or stops beating
the one above it. A pruned pretrained CNN can need that: on EfficientNet-Lite0, 40 AdamW steps at
6.25e-5 (a sixteenth of its task's rate) raised the held-out loss from 0.21 to 0.27.

The winner is not thrown away: the run goes on from ``θ_i*`` and its optimizer state (AdamW's
moments), at ``η*``, for what is left of the time budget (the budget includes the probe) or of the
planned steps. A candidate whose loss turns NaN or diverges loses (``L_h = ∞``). This is the
"short run per learning rate, keep the best" of hyper-parameter search with successive halving
cut to one rung (Jamieson & Talwalkar 2016, arXiv 1502.07943; Li et al., Hyperband, arXiv 1603.06560).

``n``: at most ``steps`` (``PROBE_STEPS``), at most ``1 / (2k)`` of the planned steps, and under a
time budget ``B`` the first candidate runs at most ``PROBE_SHARE · B / k`` seconds; the others run
exactly the steps it ran, so every candidate sees the same batches.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from potstill.errors import NumericError
from torch import nn

from .config import TrainConfig
from .losses import DistillLoss
from .trainer import DistillTrainer

#: steps each candidate trains at most
PROBE_STEPS = 40
#: the share of a time budget the whole probe may take
PROBE_SHARE = 0.25
#: rungs tried below the smallest candidate, each a quarter of the last, while every rate raises the loss
EXTRA_RUNGS = 2

#: builds the trainer of one candidate's run from its loss and settings
MakeTrainer = Callable[[DistillLoss, TrainConfig], DistillTrainer]


@dataclass
class ProbeResult:
    """What the probe found; ``loss`` and ``optimizer_state`` are the winner's, to train on from."""

    lr: float
    #: held-out loss after the probe, per candidate (``inf``: it diverged)
    losses: dict[float, float]
    loss_before: float
    steps: int
    seconds: float
    loss: DistillLoss
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        """The metrics record: candidates as ``{"lr": loss}`` (JSON keys are strings)."""
        return {"chosen": self.lr, "heldout_losses": {f"{lr:g}": v for lr, v in self.losses.items()},
                "loss_before": self.loss_before, "steps": self.steps, "seconds": self.seconds}  # fmt: skip


def probe_steps(candidates: int, planned: int, steps: int) -> int:
    """Steps per candidate: ``steps``, but at most ``1 / (2 · candidates)`` of the planned steps (0: too few to probe)."""
    return min(steps, planned // (2 * candidates))


def probe_lr(module: nn.Module, loss: DistillLoss, data: Any, config: TrainConfig, candidates: tuple[float, ...],
             heldout_loss: Callable[[nn.Module], float], make_trainer: MakeTrainer, *, steps: int,
             loss_before: float | None = None) -> ProbeResult:  # fmt: skip
    """Train ``module`` ``steps`` steps at each of ``candidates`` from its present weights (see the
    module docstring) and leave it at the winner's weights. ``config``: the run's settings (its time
    budget bounds the probe's share); ``heldout_loss(module)``: lower is better."""
    if not candidates:
        raise ValueError("probe_lr: no candidate learning rates")
    t0 = time.perf_counter()
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    before = heldout_loss(module) if loss_before is None else loss_before
    base = dataclasses.replace(config, schedule="constant", checkpoint_dir=None, resume=False, log_path=None,
                               eval_every=0, progress=False)  # fmt: skip
    seconds = PROBE_SHARE * config.time_budget_s / len(candidates) if config.time_budget_s is not None else None
    losses: dict[float, float] = {}
    best: tuple[float, dict[str, Any], DistillLoss, dict[str, Any] | None] | None = None
    chosen, n = candidates[0], steps
    ladder = list(candidates)
    for i, lr in enumerate(ladder):
        module.load_state_dict(start)
        own = copy.deepcopy(loss)  # projections a loss learns start alike and train with their candidate
        cfg = dataclasses.replace(base, lr=lr, max_steps=n, time_budget_s=seconds if i == 0 else None)
        trainer = make_trainer(own, cfg)
        try:
            ran = trainer.fit(data).steps
            value = heldout_loss(module)
        except NumericError:  # a rate that blows the loss up loses the probe
            ran, value = n, float("inf")
        if i == 0:
            n = max(ran, 1)  # the others run what the first ran in its share of the time
        losses[lr] = value
        if best is None or value < best[0]:
            weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
            # the moments of a sharded (FSDP) run belong to its replica, which is gone: not carried over
            state = None if trainer.sharded or not hasattr(trainer, "optimizer") else trainer.optimizer.state_dict()
            best = (value, weights, own, state)
            chosen = lr
        if (i == len(ladder) - 1 and losses[min(ladder)] == best[0] > before
                and len(ladder) < len(candidates) + EXTRA_RUNGS):  # fmt: skip
            ladder.append(min(ladder) / 4)  # every rate made it worse, the smallest no more than any
    if best is None:
        raise ValueError("probe_lr: no candidate learning rates")
    module.load_state_dict(best[1])
    return ProbeResult(chosen, losses, before, n, time.perf_counter() - t0, best[2], best[3])
