"""Selective distillation: learn only from the tokens / samples worth learning from.

* AdaSPEC (arXiv 2510.19779): with a reference model ``R`` (the student distilled on all data),
  score each token by ``s = KL(p_t || q_s) − KL(p_t || q_R)`` and distil only the tokens whose
  score is in the top fraction ``k`` (0.4) of the batch: tokens the student can still learn,
  dropping those that are hard even for the reference.
* CEMA (Chen et al., ICLR 2024, "Cloud-edge elastic model adaptation via selective entropy
  distillation"): skip samples whose teacher entropy ``E = −Σ p_t log p_t`` exceeds
  ``E_max = 0.4 · ln C``; weight the rest by ``exp(−(E − E_max))`` (confident samples count more).

Both are masks on the KD term ``T² KL(p_t^T || q_s^T)``; ``adaspec_mask`` / ``cema_weights`` expose
them for inspection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from potstill.errors import InputError
from torch import nn

from .capture import run_model
from .losses import DistillLoss, LossInputs, kl_per_position, register_loss, sequence_mask, weighted_mean


def adaspec_mask(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    k: float = 0.4,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """1 for the ``round(k·n)`` valid positions with the largest ``KL_student − KL_ref``, else 0."""
    if not 0.0 < k <= 1.0:
        raise InputError(f"adaspec: k must be in (0, 1], got {k}")
    with torch.no_grad():
        score = kl_per_position(teacher_logits, student_logits) - kl_per_position(teacher_logits, ref_logits)
        flat = score.flatten()
        ok = torch.ones_like(flat, dtype=torch.bool) if valid is None else valid.flatten().bool()
        n_keep = max(1, round(k * int(ok.sum())))
        flat = flat.masked_fill(~ok, float("-inf"))
        keep = torch.zeros_like(flat)
        keep[flat.topk(n_keep).indices] = 1.0
    return keep.reshape(score.shape)


def teacher_entropy(teacher_logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def cema_weights(teacher_logits: torch.Tensor, fraction: float = 0.4) -> torch.Tensor:
    """``exp(−(E − E_max))`` where ``E < E_max = fraction · ln C``, else 0 (the sample is skipped)."""
    e = teacher_entropy(teacher_logits)
    e_max = fraction * math.log(teacher_logits.shape[-1])
    return torch.where(e < e_max, torch.exp(-(e - e_max)), torch.zeros_like(e))


@register_loss("adaspec")
class AdaSPECLoss(DistillLoss):
    """``T² KL(p_t || q_s)`` on the top-``k`` tokens by ``KL_student − KL_ref``."""

    def __init__(self, ref_model: nn.Module | None = None, k: float = 0.4, temperature: float = 1.0) -> None:
        super().__init__()
        if ref_model is None:
            raise InputError("adaspec: needs a reference model (ref_model=...)")
        # a plain list keeps the reference out of this module's parameters (it is never trained)
        self._ref = [ref_model]
        self.k, self.temperature = float(k), float(temperature)
        self.last_mask: torch.Tensor | None = None

    def frozen_models(self) -> list[nn.Module]:
        return list(self._ref)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.teacher is None:
            raise InputError("adaspec: needs a teacher")
        with torch.no_grad():
            z_r = run_model(self._ref[0], inputs.batch).logits
        z_s, z_t = inputs.student.logits, inputs.teacher.logits
        valid = sequence_mask(inputs, z_s)
        keep = adaspec_mask(z_t, z_s.detach(), z_r, self.k, valid)
        self.last_mask = keep
        t = self.temperature
        return t * t * weighted_mean(kl_per_position(z_t, z_s, t), keep, inputs.sample_weight)


@register_loss("cema")
class CEMALoss(DistillLoss):
    """``T² KL(p_t || q_s)`` weighted by ``cema_weights`` (high-entropy teacher outputs skipped)."""

    def __init__(self, fraction: float = 0.4, temperature: float = 1.0) -> None:
        super().__init__()
        if not fraction > 0:
            raise InputError(f"cema: fraction must be > 0, got {fraction}")
        self.fraction, self.temperature = float(fraction), float(temperature)
        self.last_weights: torch.Tensor | None = None

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.teacher is None:
            raise InputError("cema: needs a teacher")
        z_s, z_t = inputs.student.logits, inputs.teacher.logits
        w = cema_weights(z_t, self.fraction)
        if inputs.sample_weight is not None:
            w = w * inputs.sample_weight.reshape(-1, *([1] * (w.dim() - 1)))
        self.last_weights = w
        kl = kl_per_position(z_t, z_s, self.temperature)
        mask = sequence_mask(inputs, z_s)
        if mask is not None:
            w = w * mask.to(w.dtype)
        t = self.temperature
        # w carries both the exclusion (0) and the per-sample weight; the mean is over kept positions
        return t * t * (kl * w).sum() / (w != 0).sum().clamp_min(1)
