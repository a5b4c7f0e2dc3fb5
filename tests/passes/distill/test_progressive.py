from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from potstill.errors import InputError
from potstill.passes.distill import TensorBatches, TrainConfig
from potstill.passes.distill.losses import KDLoss, SumLoss
from potstill.passes.distill.progressive import (
    ProgressiveDistiller,
    Stage,
    ernie_tiny_stages,
    iterative_prune_distill,
    param_count,
)
from torch import nn

from .conftest import mlp


def test_ernie_tiny_stages_change_teacher_data_and_objective(teacher_data, tmp_path: Path) -> None:
    pretrained, x, y = teacher_data
    finetuned = copy.deepcopy(pretrained)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    general, task = TensorBatches(x[:256], batch_size=64), TensorBatches(x[256:], y[256:], batch_size=64)
    general.name, task.name = "general", "task"  # type: ignore[attr-defined]
    pretrained.name, finetuned.name = "pretrained", "finetuned"  # type: ignore[assignment]
    latent = {"student_modules": ("0",), "teacher_modules": ("0",)}
    stages = ernie_tiny_stages(general, task, pretrained, finetuned, latent_options=latent, alpha=0.5,
                               train={"epochs": 2})
    student = mlp(8, 16, 5, seed=3)
    cfg = TrainConfig(lr=1e-2, progress=False, checkpoint_dir=tmp_path)
    runner = ProgressiveDistiller(stages, config=cfg)
    results = runner.run(student)
    assert [(r.teacher, r.data, r.loss) for r in results] == [
        ("pretrained", "general", "hidden"),
        ("finetuned", "general", "hidden"),
        ("finetuned", "task", "hidden"),
        ("finetuned", "task", "hidden+kd"),
    ]
    assert [t.teacher is finetuned for t in runner.trainers] == [False, True, True, True]
    last = runner.trainers[-1].loss
    assert isinstance(last, SumLoss) and isinstance(last.parts["kd"], KDLoss) and last.parts["kd"].alpha == 0.5
    assert all(r.result.steps == 8 for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "stage-0-general-distillation", "stage-1-general-enhanced", "stage-2-task-adaptive", "stage-3-task-specific"]
    # the last stage's objective has the hard-label term: unlabelled task data is refused there only
    unlabelled = TensorBatches(x[256:], batch_size=64)
    stages = ernie_tiny_stages(general, unlabelled, pretrained, finetuned, latent_options=latent, alpha=0.5,
                               train={"epochs": 1})
    runner = ProgressiveDistiller(stages, config=TrainConfig(progress=False))
    with pytest.raises(InputError, match="needs labels"):
        runner.run(student)
    assert len(runner.trainers) == 4


def test_stage_inherits_and_rejects_unknown_options(teacher_data) -> None:
    teacher, x, _ = teacher_data
    with pytest.raises(InputError, match="no data"):
        ProgressiveDistiller([Stage("a")], teacher).run(mlp(8, 4, 5, 0))
    with pytest.raises(InputError, match="unknown training option"):
        ProgressiveDistiller([Stage("a", train={"epoch": 1})], teacher, TensorBatches(x, batch_size=64)).run(
            mlp(8, 4, 5, 0))


def _shrink(module: nn.Sequential, ratio: float) -> nn.Sequential:
    """A stand-in pruner: keep the first (1 - ratio) hidden units of a 2-layer MLP."""
    keep = max(1, round(module[0].out_features * (1 - ratio)))
    new = nn.Sequential(nn.Linear(module[0].in_features, keep), nn.ReLU(), nn.Linear(keep, module[2].out_features))
    with torch.no_grad():
        new[0].weight.copy_(module[0].weight[:keep])
        new[0].bias.copy_(module[0].bias[:keep])
        new[2].weight.copy_(module[2].weight[:, :keep])
        new[2].bias.copy_(module[2].bias)
    return new


def test_iterative_prune_distill_reaches_the_target_in_rounds(teacher_data) -> None:
    teacher, x, _ = teacher_data
    student = mlp(8, 64, 5, seed=0)
    start = param_count(student)
    distilled: list[int] = []

    def distill(module: nn.Module, r: int) -> int:
        from potstill.passes.distill import DistillTrainer

        DistillTrainer(module, teacher, "kd", TrainConfig(epochs=1, progress=False)).fit(TensorBatches(x, batch_size=64))
        distilled.append(param_count(module))
        return r

    final, rounds = iterative_prune_distill(student, _shrink, distill, target=0.2)
    assert len(rounds) == 3  # 80 % reduction: at most half per round
    assert all(r.ratio <= 0.5 + 1e-9 for r in rounds)
    assert param_count(final) / start == pytest.approx(0.2, abs=0.03)
    assert distilled == [r.size for r in rounds]
    with pytest.raises(InputError, match="target"):
        iterative_prune_distill(student, _shrink, distill, target=1.5)
