from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from potstill.errors import InputError
from potstill.inputs.data import Batch
from potstill.passes.distill import DistillTrainer, StudentSpec, TensorBatches, TrainConfig
from potstill.passes.distill.checkpoint import list_checkpoints
from potstill.passes.distill.evaluate import evaluate
from potstill.passes.distill.schedule import cosine_factor
from torch import nn

from .conftest import mlp


def _agreement(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    return evaluate(student, teacher, TensorBatches(x, batch_size=256, shuffle=False))["agreement"]


def test_kd_student_agreement_beats_no_training(teacher_data) -> None:
    teacher, x, y = teacher_data
    student = mlp(8, 16, 5, seed=3)
    before = _agreement(student, teacher, x[400:])
    cfg = TrainConfig(epochs=8, lr=1e-2, progress=False)
    result = DistillTrainer(student, teacher, "kd", cfg, temperature=2.0).fit(TensorBatches(x[:400], y[:400], batch_size=32))
    after = _agreement(student, teacher, x[400:])
    assert result.steps == 8 * 13
    assert after > before + 0.2
    assert after > 0.7


def test_hidden_mse_reduces_feature_distance(teacher_data) -> None:
    teacher, x, _ = teacher_data
    student = mlp(8, 32, 5, seed=4)

    def distance() -> float:
        with torch.no_grad():
            hs, ht = student[0](x), teacher[0](x)
            return float((loss.projections["0"](hs) - ht).pow(2).mean())

    cfg = TrainConfig(epochs=5, lr=5e-3, progress=False)
    trainer = DistillTrainer(student, teacher, "hidden", cfg, student_modules=("0",), teacher_modules=("0",))
    loss = trainer.loss
    trainer._setup(Batch((x[:4],)))  # build the projection to measure the starting distance
    start = distance()
    trainer.fit(TensorBatches(x, batch_size=64))
    assert distance() < 0.5 * start
    assert loss.projections["0"].weight.shape == (64, 32)


def test_cosine_schedule_with_warmup() -> None:
    assert cosine_factor(0, 100, 10) == pytest.approx(0.1)
    assert cosine_factor(9, 100, 10) == pytest.approx(1.0)
    assert cosine_factor(10, 100, 10) == pytest.approx(1.0)
    assert cosine_factor(55, 100, 10) == pytest.approx(0.5)
    assert cosine_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)


def test_metrics_log_checkpoints_and_eval(tmp_path: Path, teacher_data) -> None:
    teacher, x, y = teacher_data
    student = mlp(8, 16, 5, seed=3)
    cfg = TrainConfig(epochs=2, lr=1e-2, progress=False, log_every=4, checkpoint_every=5, keep_checkpoints=2,
                      checkpoint_dir=tmp_path / "ck", log_path=tmp_path / "log.jsonl", eval_every=8)
    result = DistillTrainer(student, teacher, "kd", cfg).fit(
        TensorBatches(x[:256], y[:256], batch_size=32), TensorBatches(x[256:], y[256:], batch_size=128))
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "lr" in r] == [4, 8, 12, 16]
    assert any("eval" in r and r["step"] == 8 for r in lines)
    assert lines[-1]["final"] and "accuracy" in lines[-1]["eval"]["student0"]
    assert [p.name for p in list_checkpoints(tmp_path / "ck")] == ["step-00000015", "step-00000016"]
    assert set(result.metrics["student0"]) == {"accuracy", "cosine", "agreement"}


def test_inplace_distillation_and_student_configs(teacher_data) -> None:
    """Subnet students (module, config): the largest learns from labels, the others from it."""
    _, x, y = teacher_data
    torch.manual_seed(0)
    shared = mlp(8, 32, 5, seed=5)
    seen: list[int] = []

    def forward(module: nn.Module, batch: Batch, width: int) -> torch.Tensor:
        seen.append(width)
        h = torch.relu(batch.args[0] @ module[0].weight[:width].T + module[0].bias[:width])
        return h @ module[2].weight[:, :width].T + module[2].bias

    specs = [StudentSpec(shared, 32, forward=forward), StudentSpec(shared, 8, weight=0.5, forward=forward)]
    cfg = TrainConfig(epochs=12, lr=2e-2, inplace=True, balance=True, progress=False)
    trainer = DistillTrainer(specs, None, "kd", cfg)
    trainer.fit(TensorBatches(x, y, batch_size=64))
    assert set(seen) == {32, 8}
    with torch.no_grad():
        small = forward(shared, Batch((x,)), 8).argmax(-1)
        large = forward(shared, Batch((x,)), 32).argmax(-1)
    assert (large == y).float().mean() > 0.75
    assert (small == large).float().mean() > 0.6
    with pytest.raises(InputError, match="teacher"):
        DistillTrainer(mlp(8, 4, 5, 0), None, "kd", TrainConfig())


def test_bf16_autocast_on_cpu_when_asked(teacher_data) -> None:
    teacher, x, y = teacher_data
    student = mlp(8, 16, 5, seed=3)
    seen: set[torch.dtype] = set()
    hook = student[0].register_forward_hook(lambda _m, _i, out: seen.add(out.dtype) if torch.is_grad_enabled() else None)
    cfg = TrainConfig(epochs=2, lr=1e-2, precision="bf16", progress=False)
    result = DistillTrainer(student, teacher, "kd", cfg).fit(TensorBatches(x, y, batch_size=64))
    hook.remove()
    assert math.isfinite(result.loss)
    assert seen == {torch.bfloat16}  # the training forward ran under bf16 autocast
    assert student[0].weight.dtype == torch.float32
    with pytest.raises(InputError, match="fp16 needs CUDA"):
        DistillTrainer(student, teacher, "kd", TrainConfig(precision="fp16", device="cpu", progress=False)).fit(
            TensorBatches(x, y, batch_size=64))


def test_hf_student_hidden_and_attention_losses() -> None:
    transformers = pytest.importorskip("transformers")
    cfg_t = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=32, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    teacher = transformers.BertModel(cfg_t).eval()
    cfg_s = transformers.BertConfig(**(cfg_t.to_dict() | {"num_hidden_layers": 2, "hidden_size": 8,
                                                          "num_attention_heads": 2, "intermediate_size": 16}))
    torch.manual_seed(1)
    student = transformers.BertModel(cfg_s)
    twin = transformers.BertModel(cfg_s)
    twin.load_state_dict(student.state_dict())
    ids = torch.randint(0, 50, (32, 6), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones(8, 6, dtype=torch.long)} for i in range(0, 32, 8)]
    torch.manual_seed(2)  # the same projection init and shuffling for both runs below
    trainer = DistillTrainer(student, teacher, "hidden+attention+cosine", TrainConfig(epochs=3, lr=5e-3, progress=False))
    first = trainer.fit(data)
    assert set(trainer.loss.parts["hidden"].projections) == {"0", "1"}  # type: ignore[union-attr]
    assert trainer.loss.parts["hidden"].projections["0"].weight.shape == (16, 8)  # type: ignore[union-attr,index]
    assert first.steps == 12 and math.isfinite(first.loss)
    # the attention term acts: the same student and data without it train to other weights
    torch.manual_seed(2)
    without = DistillTrainer(twin, teacher, "hidden+cosine", TrainConfig(epochs=3, lr=5e-3, progress=False)).fit(data)
    assert without.steps == 12 and math.isfinite(without.loss)
    q_with = student.encoder.layer[0].attention.self.query.weight
    q_without = twin.encoder.layer[0].attention.self.query.weight
    assert not torch.allclose(q_with, q_without, atol=1e-6)


@pytest.mark.parametrize("dropout", [False, True])
def test_students_train_with_dropout_only_when_asked(teacher_data, dropout: bool) -> None:
    """Without dropout the student trains with every module in eval mode but BatchNorm (which keeps
    learning its statistics); an evaluation between steps leaves that as it was."""
    teacher, x, y = teacher_data
    student = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 5))
    seen: list[tuple[bool, bool]] = []
    student[3].register_forward_hook(lambda m, i, o: seen.append((m.training, student[1].training)))
    cfg = TrainConfig(epochs=2, lr=1e-2, progress=False, dropout=dropout, eval_every=2)
    before = student[1].running_mean.clone()
    DistillTrainer(student, teacher, "kd", cfg).fit(TensorBatches(x[:128], y[:128], batch_size=32),
                                                    eval_data=TensorBatches(x[400:], y[400:], batch_size=64))
    training = [s for s in seen if s[1]]  # forwards of training steps (BatchNorm in train mode)
    assert len(training) == 2 * 4
    assert all(drop == dropout for drop, _ in training)
    assert not torch.equal(before, student[1].running_mean)  # BatchNorm learnt statistics either way
    assert not student.training and not student[3].training  # handed back in eval mode


def test_frozen_batchnorm_keeps_its_statistics_while_the_weights_train(teacher_data) -> None:
    teacher, x, y = teacher_data
    student = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    stats = (student[1].running_mean.clone(), student[1].running_var.clone())
    weight = student[0].weight.detach().clone()
    cfg = TrainConfig(epochs=1, lr=1e-2, progress=False, batchnorm="frozen")
    DistillTrainer(student, teacher, "kd", cfg).fit(TensorBatches(x[:128], y[:128], batch_size=32))
    assert torch.equal(stats[0], student[1].running_mean) and torch.equal(stats[1], student[1].running_var)
    assert not torch.equal(weight, student[0].weight)
