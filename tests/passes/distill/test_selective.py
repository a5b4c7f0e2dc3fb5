from __future__ import annotations

import math

import pytest
import torch
from potstill.passes.distill import DistillTrainer, TensorBatches, TrainConfig
from potstill.passes.distill.losses import kl_per_position
from potstill.passes.distill.selective import adaspec_mask, cema_weights, teacher_entropy
from torch import nn

C = 5


def test_adaspec_mask_keeps_exactly_the_top_k_fraction() -> None:
    g = torch.Generator().manual_seed(0)
    z_t, z_s, z_r = (torch.randn(4, 5, C, generator=g) for _ in range(3))
    valid = torch.ones(4, 5)
    valid[0, 3:] = 0  # 18 valid positions
    keep = adaspec_mask(z_t, z_s, z_r, k=0.4, valid=valid)
    assert int(keep.sum()) == round(0.4 * 18)
    assert float((keep * (1 - valid)).sum()) == 0
    score = kl_per_position(z_t, z_s) - kl_per_position(z_t, z_r)
    kept, dropped = score[keep.bool()], score[(1 - keep).bool() & valid.bool()]
    assert float(kept.min()) >= float(dropped.max())
    assert int(adaspec_mask(z_t, z_s, z_r, k=0.25).sum()) == 5  # 25 % of 20


def test_cema_excludes_high_entropy_samples_and_weights_the_rest() -> None:
    logits = torch.tensor([[8.0, 0, 0, 0, 0], [2.0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0], [4.0, 1, 0, 0, 0]])
    e = teacher_entropy(logits)
    e_max = 0.4 * math.log(C)
    w = cema_weights(logits, 0.4)
    for i in range(4):
        if e[i] >= e_max:
            assert w[i] == 0
        else:
            assert float(w[i]) == pytest.approx(math.exp(-(float(e[i]) - e_max)))
    assert w[2] == 0 and w[1] == 0 and w[0] > w[3] > 1.0


class HashTeacher(nn.Module):
    """Per token: a linear teacher on 'learnable' tokens, a confident hash of x on 'hard' ones."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Linear(d, C, bias=False)
        torch.nn.init.normal_(self.w.weight, std=1.0, generator=torch.Generator().manual_seed(0))

    @staticmethod
    def hard(x: torch.Tensor) -> torch.Tensor:
        return x[..., -1] > 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = (x * 997).floor().sum(-1).long() % C
        noise = 6.0 * torch.nn.functional.one_hot(code, C).float()
        return torch.where(self.hard(x).unsqueeze(-1), noise, 2.0 * self.w(x))


def _kd(student: nn.Module, teacher: nn.Module, data: TensorBatches, loss: str = "kd", epochs: int = 6,
        **options) -> nn.Module:
    DistillTrainer(student, teacher, loss, TrainConfig(epochs=epochs, lr=2e-2, progress=False), **options).fit(data)
    return student.eval()


def _linear(d: int) -> nn.Module:
    torch.manual_seed(3)
    return nn.Linear(d, C)


def _mlp(d: int) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, C))


def test_adaspec_focuses_a_small_student_on_learnable_tokens() -> None:
    """37 % of tokens are unlearnable hashes. On a one-epoch budget, AdaSPEC (reference: the same
    student distilled to convergence) spends it on learnable tokens and agrees with the teacher there
    far more often than plain KD. (At convergence both end at the reference: the selection's fixed
    point is the reference itself.)"""
    d = 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 6, d, generator=g)  # 600 sequences of 6 tokens
    teacher = HashTeacher(d).eval()
    train, test = TensorBatches(x[:500], batch_size=25), x[500:]
    ref = _kd(_mlp(d), teacher, train)
    plain = _kd(_mlp(d), teacher, train, epochs=1)
    ada = _kd(_mlp(d), teacher, train, "adaspec", epochs=1, ref_model=ref, k=0.4)

    def fidelity(student: nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            z_t, z_s = teacher(test), student(test)
        easy = ~HashTeacher.hard(test)
        kl = float(kl_per_position(z_t, z_s)[easy].mean())
        agree = float((z_t.argmax(-1) == z_s.argmax(-1))[easy].float().mean())
        return kl, agree

    (kl_plain, ag_plain), (kl_ada, ag_ada) = fidelity(plain), fidelity(ada)
    assert ag_ada > ag_plain + 0.05, (ag_ada, ag_plain)
    assert kl_ada < kl_plain, (kl_ada, kl_plain)


class ConfusedTeacher(nn.Module):
    """Right and confident, except in one region where it is unsure and leans to the wrong class."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Linear(d, C, bias=False)
        torch.nn.init.normal_(self.w.weight, std=1.0, generator=torch.Generator().manual_seed(0))

    @staticmethod
    def confused(x: torch.Tensor) -> torch.Tensor:
        return x[..., 0] > 0.5

    def truth(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x).argmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sharp = 10.0 * self.w(x) / self.w(x).norm(dim=-1, keepdim=True)
        wrong = 1.5 * torch.nn.functional.one_hot((self.truth(x) + 1) % C, C).float()
        return torch.where(self.confused(x).unsqueeze(-1), wrong, sharp)


def test_cema_skips_a_confused_teacher_region() -> None:
    d = 8
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, d, generator=g)
    teacher = ConfusedTeacher(d).eval()
    train, test = TensorBatches(x[:2500], batch_size=50), x[2500:]
    with torch.no_grad():
        frac_excluded = float((cema_weights(teacher(x[:2500])) == 0).float().mean())
    assert 0.25 < frac_excluded < 0.6  # the confused region (~31 %) plus a few boundary samples
    plain = _kd(_linear(d), teacher, train)
    cema = _kd(_linear(d), teacher, train, "cema", fraction=0.4)
    with torch.no_grad():
        truth = teacher.truth(test)
        acc_plain = float((plain(test).argmax(-1) == truth).float().mean())
        acc_cema = float((cema(test).argmax(-1) == truth).float().mean())
    assert acc_cema > acc_plain + 0.1, (acc_cema, acc_plain)
