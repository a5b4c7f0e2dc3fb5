"""Progressive distillation: stages that change the teacher, the data or the objective.

* ERNIE-Tiny (Su et al., arXiv 2106.02241) distils in four stages, each changing one thing:
  1. general distillation — pretrained teacher, general data, latent (hidden-state) loss;
  2. general-enhanced — the *fine-tuned* teacher, still general data, latent loss;
  3. task-adaptive — fine-tuned teacher, *task* data, latent loss;
  4. task-specific — fine-tuned teacher, task data, latent + soft labels + hard labels
     (``hidden + kd`` with ``α < 1``: ``L = L_hidden + α T² KL + (1 − α) CE``).
* Iterative prune → distill (Minitron, arXiv 2407.14679: for more than 50 % reduction prune and
  retrain in rounds): with size ratio ``r`` now and target ``ρ`` after ``n`` rounds, each round
  keeps ``(ρ/r)^(1/n_left)`` of the current size, then distils. The pruner is a callable argument
  (``prune(module, ratio) -> module`` removing ``ratio`` of the current size), so this module does
  not depend on how pruning is done.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potstill.errors import InputError
from torch import nn

from .config import DataSource, TrainConfig, TrainResult
from .trainer import DistillTrainer


@dataclass
class Stage:
    """One stage: what it changes (teacher, data, loss) and its training overrides."""

    name: str
    loss: str = "kd"
    loss_options: dict[str, Any] = field(default_factory=dict)
    #: None keeps the previous stage's teacher
    teacher: nn.Module | None = None
    #: None keeps the previous stage's data
    data: DataSource | None = None
    #: TrainConfig fields to override (epochs, max_steps, lr, ...)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    name: str
    loss: str
    teacher: str
    data: str
    result: TrainResult


def _label(obj: Any) -> str:
    return getattr(obj, "name", None) or getattr(obj, "__name__", None) or type(obj).__name__


class ProgressiveDistiller:
    """Run ``stages`` in order on one student; each stage inherits what it does not change."""

    def __init__(
        self,
        stages: Sequence[Stage],
        teacher: nn.Module | None = None,
        data: DataSource | None = None,
        config: TrainConfig | None = None,
        eval_data: DataSource | None = None,
    ) -> None:
        if not stages:
            raise InputError("a progressive recipe needs at least one stage")
        self.stages, self.teacher, self.data = list(stages), teacher, data
        self.config, self.eval_data = config or TrainConfig(), eval_data
        self.trainers: list[DistillTrainer] = []

    def run(self, student: nn.Module) -> list[StageResult]:
        teacher, data = self.teacher, self.data
        results = []
        for i, stage in enumerate(self.stages):
            teacher = stage.teacher if stage.teacher is not None else teacher
            data = stage.data if stage.data is not None else data
            if data is None:
                raise InputError(f"stage {i} ('{stage.name}'): no data (give the recipe or the stage data)")
            known = {f.name for f in dataclasses.fields(TrainConfig)}
            bad = sorted(set(stage.train) - known)
            if bad:
                raise InputError(f"stage {i} ('{stage.name}'): unknown training option(s) {bad}")
            cfg = dataclasses.replace(self.config, **stage.train)
            if cfg.checkpoint_dir is not None:
                cfg = dataclasses.replace(cfg, checkpoint_dir=Path(cfg.checkpoint_dir) / f"stage-{i}-{stage.name}")
            trainer = DistillTrainer(student, teacher, stage.loss, cfg, **stage.loss_options)
            self.trainers.append(trainer)
            result = trainer.fit(data, self.eval_data)
            results.append(StageResult(stage.name, stage.loss, _label(teacher), _label(data), result))
        return results


def ernie_tiny_stages(
    general_data: DataSource,
    task_data: DataSource,
    pretrained_teacher: nn.Module,
    finetuned_teacher: nn.Module,
    *,
    latent_loss: str = "hidden",
    latent_options: dict[str, Any] | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    train: dict[str, Any] | None = None,
) -> list[Stage]:
    """ERNIE-Tiny's four stages (see the module docstring)."""
    lat = dict(latent_options or {})
    tr = dict(train or {})
    return [
        Stage("general-distillation", latent_loss, lat, pretrained_teacher, general_data, tr),
        Stage("general-enhanced", latent_loss, lat, finetuned_teacher, general_data, tr),
        Stage("task-adaptive", latent_loss, lat, finetuned_teacher, task_data, tr),
        Stage("task-specific", f"{latent_loss}+kd", lat | {"temperature": temperature, "alpha": alpha},
              finetuned_teacher, task_data, tr),
    ]


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class PruneRound:
    round: int
    ratio: float
    size: int
    distill: Any


def iterative_prune_distill(
    student: nn.Module,
    prune: Callable[[nn.Module, float], nn.Module],
    distill: Callable[[nn.Module, int], Any],
    target: float,
    *,
    rounds: int | None = None,
    size: Callable[[nn.Module], float] = param_count,
    max_rounds: int = 10,
    tolerance: float = 0.05,
) -> tuple[nn.Module, list[PruneRound]]:
    """Prune to ``target`` × the starting size in rounds, distilling after each.

    ``rounds`` defaults to the fewest that remove at most half the current size per round. Extra
    rounds run while the size is more than ``tolerance`` (relative) above the target and a round
    still shrinks the model.
    """
    if not 0 < target < 1:
        raise InputError(f"iterative pruning: target must be in (0, 1), got {target}")
    n = rounds or max(1, math.ceil(math.log(target) / math.log(0.5) - 1e-9))
    start = size(student)
    history: list[PruneRound] = []
    for r in range(max_rounds):
        before = size(student)
        current = before / start
        if current <= target * (1 + tolerance):
            break
        left = max(n - r, 1)
        ratio = 1 - (target / current) ** (1 / left)
        student = prune(student, ratio)
        after = size(student)
        history.append(PruneRound(r, ratio, int(after), distill(student, r)))
        if after >= before:
            break
    return student, history
