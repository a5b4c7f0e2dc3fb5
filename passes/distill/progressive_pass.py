"""The ``distill.progressive`` pass: run a recipe's ``stages:`` on the working student.

Each stage changes the loss, the teacher or the data and inherits the rest (see
``progressive.ProgressiveDistiller``; ERNIE-Tiny, Su et al. arXiv 2106.02241). The stages come
from the compile recipe (``stages:``), which the planner puts into this pass's ``stages`` option;
the pass's own options are the training settings every stage starts from (the recipe's
``train:``). Checkpoints go to ``state.work_dir/checkpoints/<student>/stage-<i>-<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from potstill.errors import InputError
from potstill.pipeline import Pass, PassResult, register_pass
from potstill.state import CompileState

from .config import TrainConfig
from .progressive import ProgressiveDistiller
from .recipe import Recipe, StageSpec, build_stages


@dataclass(frozen=True)
class ProgressiveOptions:
    #: the stages, in order (from the recipe's stages:)
    stages: tuple[StageSpec, ...] = ()
    #: epochs of a stage that does not say
    epochs: int = 1
    #: learning rate of a stage that does not say
    lr: float = 1e-3
    #: optimiser steps per stage (None: the epochs decide)
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


@register_pass
class ProgressiveDistillPass(Pass):
    """Distil the working student in the recipe's stages (loss, teacher or data change per stage)."""

    name = "distill.progressive"
    Options = ProgressiveOptions
    ensures = frozenset({"distilled"})
    collective = True

    def run(self, state: CompileState) -> PassResult:
        o = self.options
        if not o.stages:
            raise InputError("distill.progressive has no stages: give 'stages:' in the recipe")
        student = state.working()
        ckpt = state.work_dir / "checkpoints" / student.name if state.work_dir is not None else None
        config = TrainConfig(epochs=o.epochs, lr=o.lr, max_steps=o.max_steps, seed=state.seed, checkpoint_dir=ckpt)
        stages = build_stages(Recipe(version=1, stages=list(o.stages)))
        distiller = ProgressiveDistiller(stages, teacher=state.teacher,
                                         data=state.train_data or state.calib_data, config=config,
                                         eval_data=state.eval_data)  # fmt: skip
        results = distiller.run(student.module)
        student.module.eval()
        record: list[dict[str, Any]] = [
            {"name": r.name, "loss_name": r.loss, "teacher": r.teacher, "data": r.data, "steps": r.result.steps,
             "loss": r.result.loss, "seconds": r.result.seconds}
            for r in results
        ]  # fmt: skip
        student.metrics["distill"] = {"method": "progressive", "stages": record}
        state.facts.add("distilled")
        return PassResult(state, True)
