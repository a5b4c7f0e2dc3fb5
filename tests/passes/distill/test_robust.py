from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from potstill.inputs.data import Batch
from potstill.passes.distill import DistillTrainer, TensorBatches, TrainConfig
from potstill.passes.distill.robust import PGDConfig, attack, pgd, robust_accuracy

from .conftest import mlp


def test_pgd_stays_in_the_ball_and_the_valid_range_and_raises_the_loss() -> None:
    model = mlp(4, 16, 3, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 4, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)

    def objective(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z, y, reduction="sum")

    for norm in ("linf", "l2"):
        cfg = PGDConfig(eps=0.1, step_size=0.03, steps=10, norm=norm)
        x_adv = pgd(model, x, objective, cfg, clamp=(0.0, 1.0))
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= 0.1 + 1e-6
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        with torch.no_grad():
            assert objective(model(x_adv)) > objective(model(x))


def test_token_inputs_are_attacked_in_embedding_space() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=8, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 30, (4, 5), generator=torch.Generator().manual_seed(0))
    batch = Batch((), {"input_ids": ids, "attention_mask": torch.ones(4, 5, dtype=torch.long)}, torch.tensor([0, 1, 2, 0]))
    adv = attack(model, batch, lambda z: F.cross_entropy(z, batch.target, reduction="sum"),  # type: ignore[arg-type]
                 PGDConfig(eps=0.5, step_size=0.2, steps=3, norm="l2"))
    assert "input_ids" not in adv.kwargs
    emb = model.get_input_embeddings()(ids).detach()
    delta = (adv.kwargs["inputs_embeds"] - emb).flatten(1).norm(dim=1)
    assert float(delta.max()) <= 0.5 + 1e-5 and float(delta.min()) > 0


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def test_rslad_and_ard_raise_robust_accuracy_over_plain_kd() -> None:
    x, y = _digits()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    teacher = mlp(64, 128, 10, seed=0)
    DistillTrainer(teacher, None, "kd", TrainConfig(epochs=10, lr=3e-3, progress=False), alpha=0.0).fit(
        TensorBatches(x[tr], y[tr], batch_size=64))
    teacher.eval()
    eps = {"eps": 0.2, "step_size": 0.05, "steps": 5}
    test = TensorBatches(x[te], y[te], batch_size=400, shuffle=False)
    results = {}
    for method, options in {"kd": {}, "rslad": eps, "ard": eps | {"alpha": 0.9}}.items():
        student = mlp(64, 32, 10, seed=1)
        cfg = TrainConfig(epochs=12, lr=3e-3, progress=False)
        DistillTrainer(student, teacher, method, cfg, **options).fit(TensorBatches(x[tr], y[tr], batch_size=64))
        results[method] = robust_accuracy(student, test, PGDConfig(eps=0.2, step_size=0.05, steps=20))
    teacher_acc = robust_accuracy(teacher, test, PGDConfig(eps=0.2, step_size=0.05, steps=20))
    assert teacher_acc["clean_accuracy"] > 0.9
    assert results["kd"]["clean_accuracy"] > 0.85
    for method in ("rslad", "ard"):
        assert results[method]["robust_accuracy"] > results["kd"]["robust_accuracy"] + 0.15, results
        assert results[method]["clean_accuracy"] > 0.8, results
