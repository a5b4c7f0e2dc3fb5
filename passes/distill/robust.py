"""Adversarially robust distillation: PGD on the student's input, ARD and RSLAD losses.

PGD (Madry et al., arXiv 1706.06083): from a random start in the ε-ball, repeat
``δ ← Π_ε(δ + η · sign(∇_δ J))`` (L∞; L2 uses the normalised gradient), clamping ``x + δ`` to the
valid input range. Defaults: ε = 8/255, η = 2/255, 10 steps in training, 20 in evaluation.

* ARD (Goldblum et al., AAAI 2020, arXiv 1905.09747): ``x_adv = argmax CE(S(x+δ), y)``,
  ``L = α T² KL(T(x)/T || S(x_adv)/T) + (1 − α) CE(S(x), y)``.
* RSLAD (Zi et al., ICCV 2021, arXiv 2108.07969): ``x_adv = argmax KL(T(x) || S(x+δ))``,
  ``L = 5/6 KL(T(x) || S(x_adv)) + 1/6 KL(T(x) || S(x))`` — the teacher's soft labels replace
  the hard labels everywhere.

Token inputs (a batch with ``input_ids`` and a model with ``get_input_embeddings``) are attacked in
embedding space: ``inputs_embeds = E[input_ids] + δ`` with ``δ`` in an L2/L∞ ball, no clamp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from potstill.errors import InputError
from potstill.inputs.data import Batch, iter_batches, primary_output
from torch import nn

from .frozen import evaluating
from .losses import DistillLoss, LossInputs, kl_per_position, register_loss, weighted_mean


@dataclass(frozen=True)
class PGDConfig:
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    norm: str = "linf"  # linf | l2
    clamp: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.norm not in {"linf", "l2"}:
            raise InputError(f"pgd: norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.eps < 0 or self.step_size <= 0 or self.steps < 0:
            raise InputError(f"pgd: need eps >= 0, step_size > 0, steps >= 0 (got {self})")


def _l2_normalize(g: torch.Tensor) -> torch.Tensor:
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / norm.reshape(-1, *([1] * (g.dim() - 1)))


def _project(delta: torch.Tensor, cfg: PGDConfig) -> torch.Tensor:
    if cfg.norm == "linf":
        return delta.clamp(-cfg.eps, cfg.eps)
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (cfg.eps / norm).clamp(max=1.0)
    return delta * factor.reshape(-1, *([1] * (delta.dim() - 1)))


def pgd(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    cfg: PGDConfig,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``x + δ`` maximising ``objective(fn(x + δ))`` (a scalar) with ``δ`` in the ε-ball."""
    x = x.detach()
    with torch.no_grad():
        if cfg.random_start and cfg.eps > 0:
            delta = torch.empty_like(x).uniform_(-cfg.eps, cfg.eps)
            delta = _project(delta, cfg)
        else:
            delta = torch.zeros_like(x)
        if clamp is not None:
            delta = (x + delta).clamp(*clamp) - x
    with torch.enable_grad():
        for _ in range(cfg.steps):
            delta.requires_grad_(True)
            obj = objective(fn(x + delta))
            (grad,) = torch.autograd.grad(obj, [delta])
            with torch.no_grad():
                step = grad.sign() if cfg.norm == "linf" else _l2_normalize(grad)
                delta = _project(delta + cfg.step_size * step, cfg)
                if clamp is not None:
                    delta = (x + delta).clamp(*clamp) - x
    return (x + delta).detach()


@dataclass
class AttackSurface:
    """Where a batch is attacked: the tensor ``x``, how to rebuild the batch, the valid range."""

    x: torch.Tensor
    rebuild: Callable[[torch.Tensor], Batch]
    clamp: tuple[float, float] | None


def attack_surface(model: nn.Module, batch: Batch, cfg: PGDConfig) -> AttackSurface:
    """The first floating-point input; token ids are replaced by their embeddings."""
    ids = batch.kwargs.get("input_ids")
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if isinstance(ids, torch.Tensor) and callable(get_embeddings):
        emb = get_embeddings()(ids).detach()
        rest = {k: v for k, v in batch.kwargs.items() if k != "input_ids"}

        def with_embeds(e: torch.Tensor) -> Batch:
            return Batch(batch.args, rest | {"inputs_embeds": e}, batch.target)

        return AttackSurface(emb, with_embeds, None)
    for i, a in enumerate(batch.args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            def rebuild(x: torch.Tensor, i: int = i) -> Batch:
                return Batch((*batch.args[:i], x, *batch.args[i + 1:]), batch.kwargs, batch.target)

            return AttackSurface(a, rebuild, cfg.clamp)
    for k, v in batch.kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "attention_mask":
            def with_kwarg(x: torch.Tensor, k: str = k) -> Batch:
                return Batch(batch.args, batch.kwargs | {k: x}, batch.target)

            return AttackSurface(v, with_kwarg, cfg.clamp)
    raise InputError("no floating-point input or input_ids to attack in this batch")


def attack(
    model: nn.Module, batch: Batch, objective: Callable[[torch.Tensor], torch.Tensor], cfg: PGDConfig
) -> Batch:
    """The adversarial batch for ``model`` (run in eval mode during the attack)."""
    surface = attack_surface(model, batch, cfg)
    with evaluating(model):
        x_adv = pgd(lambda x: primary_output(surface.rebuild(x).run(model)), surface.x, objective, cfg, surface.clamp)
    return surface.rebuild(x_adv)


def _labels(inputs: LossInputs) -> torch.Tensor:
    if inputs.target is not None:
        return inputs.target
    if inputs.teacher is None:
        raise InputError("robust distillation needs labels or a teacher")
    return inputs.teacher.logits.argmax(-1)


class _RobustLoss(DistillLoss):
    def __init__(self, *, eps: float, step_size: float, steps: int, random_start: bool, norm: str,
                 clamp: tuple[float, float] | None) -> None:
        super().__init__()
        self.pgd = PGDConfig(eps, step_size, steps, random_start, norm, None if clamp is None else tuple(clamp))  # type: ignore[arg-type]

    def _adversarial(self, inputs: LossInputs, objective: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if inputs.student_module is None or inputs.run_student is None:
            raise InputError("robust losses need the trainer's student hooks")
        adv = attack(inputs.student_module, inputs.batch, objective, self.pgd)
        return inputs.run_student(adv).logits


@register_loss("ard")
class ARDLoss(_RobustLoss):
    """``α T² KL(T(x)/T || S(x_adv)/T) + (1 − α) CE(S(x), y)``, attack maximising CE."""

    def __init__(self, *, alpha: float = 0.9, temperature: float = 1.0, eps: float = 8 / 255,
                 step_size: float = 2 / 255, steps: int = 10, random_start: bool = True, norm: str = "linf",
                 clamp: tuple[float, float] | None = (0.0, 1.0)) -> None:
        super().__init__(eps=eps, step_size=step_size, steps=steps, random_start=random_start, norm=norm,
                         clamp=clamp)
        self.alpha, self.temperature = float(alpha), float(temperature)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.teacher is None:
            raise InputError("ard: needs a teacher")
        y = _labels(inputs)
        s_adv = self._adversarial(inputs, _ce_objective(y))
        t = self.temperature
        kl = weighted_mean(kl_per_position(inputs.teacher.logits, s_adv, t), None, inputs.sample_weight)
        ce = weighted_mean(F.cross_entropy(inputs.student.logits.float(), y, reduction="none"), None,
                           inputs.sample_weight)
        return self.alpha * t * t * kl + (1 - self.alpha) * ce


@register_loss("rslad")
class RSLADLoss(_RobustLoss):
    """``5/6 KL(T(x) || S(x_adv)) + 1/6 KL(T(x) || S(x))``, attack maximising KL to the teacher."""

    def __init__(self, *, adv_weight: float = 5 / 6, eps: float = 8 / 255, step_size: float = 2 / 255,
                 steps: int = 10, random_start: bool = True, norm: str = "linf",
                 clamp: tuple[float, float] | None = (0.0, 1.0)) -> None:
        super().__init__(eps=eps, step_size=step_size, steps=steps, random_start=random_start, norm=norm,
                         clamp=clamp)
        self.adv_weight = float(adv_weight)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.teacher is None:
            raise InputError("rslad: needs a teacher")
        z_t = inputs.teacher.logits
        s_adv = self._adversarial(inputs, lambda z: kl_per_position(z_t, z).sum())
        adv = weighted_mean(kl_per_position(z_t, s_adv), None, inputs.sample_weight)
        clean = weighted_mean(kl_per_position(z_t, inputs.student.logits), None, inputs.sample_weight)
        return self.adv_weight * adv + (1 - self.adv_weight) * clean


def _ce_objective(y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def objective(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z.float(), y, reduction="sum")

    return objective


def robust_accuracy(
    model: nn.Module, data: Any, cfg: PGDConfig | None = None, limit: int | None = None, **overrides: Any
) -> dict[str, float]:
    """Clean and PGD accuracy (default PGD-20, ε = 8/255) of ``model`` on labelled ``data``."""
    cfg = replace(cfg or PGDConfig(steps=20), **overrides)
    dev = next(model.parameters()).device
    clean = robust = n = 0
    with evaluating(model):
        for batch in iter_batches(data, limit):
            batch = batch.to(dev)
            if batch.target is None:
                raise InputError("robust accuracy needs labelled batches")
            y = batch.target
            with torch.no_grad():
                clean += int((primary_output(batch.run(model)).argmax(-1) == y).sum())
            adv = attack(model, batch, _ce_objective(y), cfg)
            with torch.no_grad():
                robust += int((primary_output(adv.run(model)).argmax(-1) == y).sum())
            n += int(y.numel())
    return {"clean_accuracy": clean / max(n, 1), "robust_accuracy": robust / max(n, 1)}


def eps_options(eps: float, steps: int = 10, step_ratio: float = 0.25) -> dict[str, Any]:
    """Loss options for a given ε with the usual step ``ε/4`` (2/255 for 8/255)."""
    return {"eps": eps, "step_size": eps * step_ratio, "steps": steps}
