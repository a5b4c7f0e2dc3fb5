"""Distillation losses and their registry.

Every loss is an ``nn.Module`` (it may own learned projections) called with ``LossInputs`` and
returning a scalar. Masks: ``token_mask`` [B, S] (1 = use the position) and ``sample_weight`` [B];
a weighted mean divides by the number of positions with non-zero weight.

* ``kd`` — logit distillation (Hinton et al., 2015, arXiv 1503.02531) with a hard-label mix:
  ``α · T² · KL(softmax(z_t/T) || softmax(z_s/T)) + (1 − α) · CE(z_s, y)``.
* ``hidden`` — hidden-state MSE through a learned linear projection (FitNets, Romero et al. 2015;
  TinyBERT, arXiv 1909.10351): ``Σ_i MSE(W_i h^s_i, h^t_{m(i)})``; for a depth-pruned student
  the uniform map is ``m(i) = round((i+1)·L_t/L_s) − 1``.
* ``attention`` — attention-map matching (TinyBERT / MiniLM, arXiv 2002.10957): MSE or
  ``KL(A^t || A^s)`` of attention probabilities, heads averaged when the counts differ.
* ``cosine`` — sentence embeddings (mean pooling over the attention mask):
  ``1 − cos(W e_s, e_t)``.

``make_loss("kd+hidden", temperature=2)`` builds a sum; ``register_loss`` adds a loss by name.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from potstill.errors import InputError
from potstill.inputs.data import Batch
from torch import nn

from .capture import ModelOutputs, Want


@dataclass
class LossInputs:
    """What a loss sees for one student on one batch."""

    student: ModelOutputs
    teacher: ModelOutputs | None
    batch: Batch
    token_mask: torch.Tensor | None = None
    sample_weight: torch.Tensor | None = None
    #: the bare student module (no DDP wrapper): attacks differentiate through it
    student_module: nn.Module | None = None
    #: re-run the student (through its wrapper) on another batch, with the same captures
    run_student: Callable[[Batch], ModelOutputs] | None = None
    teacher_module: nn.Module | None = None

    @property
    def target(self) -> torch.Tensor | None:
        return self.batch.target


class DistillLoss(nn.Module):
    """Base class: ``student_want`` / ``teacher_want`` say what to capture; ``forward`` computes."""

    def student_want(self) -> Want:
        return Want()

    def teacher_want(self) -> Want:
        return Want()

    def needs_teacher(self) -> bool:
        return True

    def needs_probe(self) -> bool:
        """Whether the loss builds parameters on its first call (the trainer does a dry run)."""
        return False

    def frozen_models(self) -> list[nn.Module]:
        """Models the loss runs but never trains (moved to the device by the trainer)."""
        return []

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        raise NotImplementedError


# -- masks and reductions ------------------------------------------------------------------------


def weighted_mean(
    values: torch.Tensor, token_mask: torch.Tensor | None = None, sample_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``values`` [B, ...] over positions with non-zero weight, each scaled by its weight."""
    weight = torch.ones_like(values)
    if token_mask is not None:
        mask = token_mask.to(values.dtype)
        while mask.dim() < values.dim():
            mask = mask.unsqueeze(-1)
        weight = weight * mask
    if sample_weight is not None:
        w = sample_weight.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
        weight = weight * w
    count = (weight != 0).sum().clamp_min(1)
    return (values * weight).sum() / count


def sequence_mask(inputs: LossInputs, logits: torch.Tensor) -> torch.Tensor | None:
    """The token mask for [B, S, C] logits: the given one, else the batch's attention_mask."""
    if inputs.token_mask is not None:
        return inputs.token_mask
    am = inputs.batch.kwargs.get("attention_mask")
    if logits.dim() == 3 and isinstance(am, torch.Tensor) and am.shape == logits.shape[:2]:
        return am
    return None


def kl_per_position(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """``KL(softmax(z_t/T) || softmax(z_s/T))`` over the last dim, one value per position."""
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def ce_per_position(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    flat = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1).long(), reduction="none", ignore_index=-100
    )
    return flat.reshape(target.shape)


class KDLoss(DistillLoss):
    """``α T² KL(p_t^T || q_s^T) + (1 − α) CE(z_s, y)``; without a teacher, CE only."""

    def __init__(self, temperature: float = 1.0, alpha: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise InputError(f"kd: temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"kd: alpha must be in [0, 1], got {alpha}")
        self.temperature, self.alpha = float(temperature), float(alpha)

    def needs_teacher(self) -> bool:
        return self.alpha > 0

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        z_s = inputs.student.logits
        mask = sequence_mask(inputs, z_s)
        total = z_s.new_zeros((), dtype=torch.float32)
        use_ce = self.alpha < 1.0 or inputs.teacher is None
        if inputs.teacher is not None and self.alpha > 0:
            t = self.temperature
            kl = kl_per_position(inputs.teacher.logits, z_s, t)
            total = total + self.alpha * t * t * weighted_mean(kl, mask, inputs.sample_weight)
        if use_ce:
            if inputs.target is None:
                raise InputError(
                    "kd: alpha < 1 (or no teacher) needs labels: yield (inputs, labels) batches, or set alpha=1"
                )
            ce = ce_per_position(z_s, inputs.target)
            weight = 1.0 if inputs.teacher is None else 1.0 - self.alpha
            total = total + weight * weighted_mean(ce, mask, inputs.sample_weight)
        return total


def uniform_layer_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """Student layer i -> teacher layer ``round((i+1)·L_t/L_s) − 1`` (the last of each chunk)."""
    return {i: round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)}


def _project(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:  # [B, C, H, W]: project channels
        return proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return proj(x)


def _make_projection(d_s: int, d_t: int, device: torch.device) -> nn.Linear:
    proj = nn.Linear(d_s, d_t, bias=False, device=device)
    if d_s == d_t:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(d_t, device=device))
    return proj


class HiddenMSELoss(DistillLoss):
    """``mean_i MSE(W_i h^s_i, h^t_{m(i)})`` with learned ``W_i`` (identity-initialised if dims agree)."""

    def __init__(
        self,
        layer_map: Mapping[int, int] | None = None,
        project: bool = True,
        student_modules: tuple[str, ...] = (),
        teacher_modules: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.layer_map = None if layer_map is None else {int(k): int(v) for k, v in layer_map.items()}
        self.project = project
        self.student_modules, self.teacher_modules = tuple(student_modules), tuple(teacher_modules)
        self.projections = nn.ModuleDict()

    def needs_probe(self) -> bool:
        return self.project

    def student_want(self) -> Want:
        return Want(hidden=True, modules=self.student_modules)

    def teacher_want(self) -> Want:
        return Want(hidden=True, modules=self.teacher_modules)

    def pairs(self, n_student: int, n_teacher: int) -> dict[int, int]:
        mapping = self.layer_map or uniform_layer_map(n_student, n_teacher)
        bad = {i: j for i, j in mapping.items() if not (0 <= i < n_student and 0 <= j < n_teacher)}
        if bad:
            raise InputError(f"hidden: layer_map {bad} out of range ({n_student} student, {n_teacher} teacher layers)")
        return mapping

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.teacher is None:
            raise InputError("hidden: needs a teacher")
        hs, ht = inputs.student.hidden, inputs.teacher.hidden
        mapping = self.pairs(len(hs), len(ht))
        losses = []
        for i, j in sorted(mapping.items()):
            s, t = hs[i], ht[j].detach()
            if self.project:
                key = str(i)
                if key not in self.projections:
                    self.projections[key] = _make_projection(s.shape[-1 if s.dim() != 4 else 1],
                                                              t.shape[-1 if t.dim() != 4 else 1], s.device)
                s = _project(self.projections[key], s)
            if s.shape != t.shape:
                raise InputError(f"hidden: student layer {i} {tuple(s.shape)} vs teacher layer {j} {tuple(t.shape)}")
            err = (s.float() - t.float()).pow(2)
            err = err.mean(-1) if err.dim() == 3 else err.flatten(1).mean(1)
            mask = inputs.token_mask if err.dim() == 2 else None
            if err.dim() == 2 and mask is None:
                am = inputs.batch.kwargs.get("attention_mask")
                mask = am if isinstance(am, torch.Tensor) and am.shape == err.shape else None
            losses.append(weighted_mean(err, mask, inputs.sample_weight))
        return torch.stack(losses).mean()


class AttentionLoss(DistillLoss):
    """MSE or ``KL(A^t || A^s)`` between attention probabilities [B, H, S, S] of mapped layers."""

    def __init__(
        self,
        kind: str = "kl",
        layer_map: Mapping[int, int] | None = None,
        student_modules: tuple[str, ...] = (),
        teacher_modules: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if kind not in {"kl", "mse"}:
            raise InputError(f"attention: kind must be 'kl' or 'mse', got {kind!r}")
        self.kind = kind
        self.layer_map = None if layer_map is None else {int(k): int(v) for k, v in layer_map.items()}
        self.student_modules, self.teacher_modules = tuple(student_modules), tuple(teacher_modules)

    def student_want(self) -> Want:
        return Want(attentions=True, attention_modules=self.student_modules)

    def teacher_want(self) -> Want:
        return Want(attentions=True, attention_modules=self.teacher_modules)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.teacher is None:
            raise InputError("attention: needs a teacher")
        a_s, a_t = inputs.student.attentions, inputs.teacher.attentions
        if not a_s or not a_t:
            raise InputError("attention: the models returned no attention maps (use eager attention)")
        mapping = self.layer_map or uniform_layer_map(len(a_s), len(a_t))
        am = inputs.batch.kwargs.get("attention_mask")
        losses = []
        for i, j in sorted(mapping.items()):
            s, t = a_s[i].float(), a_t[j].detach().float()
            if s.shape[1] != t.shape[1]:  # pruned heads: compare head-averaged maps
                s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
            if self.kind == "mse":
                per_query = (s - t).pow(2).mean(-1).mean(1)
            else:
                per_query = (t * (t.clamp_min(1e-9).log() - s.clamp_min(1e-9).log())).sum(-1).mean(1)
            mask = am if isinstance(am, torch.Tensor) and am.shape == per_query.shape else None
            losses.append(weighted_mean(per_query, mask, inputs.sample_weight))
        return torch.stack(losses).mean()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence of [B, S, D] states, counting only positions where the mask is 1."""
    if hidden.dim() == 2:
        return hidden
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class CosineEmbeddingLoss(DistillLoss):
    """``1 − cos(W pool(h_s), pool(h_t))`` with mean pooling (sentence-transformers style)."""

    def __init__(self, pooling: str = "mean", mse_weight: float = 0.0) -> None:
        super().__init__()
        if pooling not in {"mean", "cls"}:
            raise InputError(f"cosine: pooling must be 'mean' or 'cls', got {pooling!r}")
        self.pooling, self.mse_weight = pooling, float(mse_weight)
        self.projections = nn.ModuleDict()

    def needs_probe(self) -> bool:
        return True

    def embed(self, out: ModelOutputs, batch: Batch) -> torch.Tensor:
        h = out.logits
        if self.pooling == "cls" and h.dim() == 3:
            return h[:, 0]
        am = batch.kwargs.get("attention_mask")
        return mean_pool(h, am if isinstance(am, torch.Tensor) else None)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.teacher is None:
            raise InputError("cosine: needs a teacher")
        e_s = self.embed(inputs.student, inputs.batch).float()
        e_t = self.embed(inputs.teacher, inputs.batch).detach().float()
        if e_s.shape[-1] != e_t.shape[-1]:
            if "p" not in self.projections:
                self.projections["p"] = _make_projection(e_s.shape[-1], e_t.shape[-1], e_s.device)
            e_s = self.projections["p"](e_s)
        loss = weighted_mean(1 - F.cosine_similarity(e_s, e_t, dim=-1), None, inputs.sample_weight)
        if self.mse_weight:
            loss = loss + self.mse_weight * weighted_mean((e_s - e_t).pow(2).mean(-1), None, inputs.sample_weight)
        return loss


class SumLoss(DistillLoss):
    """``Σ_k w_k L_k``: several objectives at once (e.g. latent + soft + hard labels)."""

    def __init__(self, parts: Mapping[str, DistillLoss], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(dict(parts))
        self.weights = {k: float((weights or {}).get(k, 1.0)) for k in self.parts}
        self.last_parts: dict[str, torch.Tensor] = {}

    def student_want(self) -> Want:
        want = Want()
        for p in self.parts.values():
            want = want | p.student_want()  # type: ignore[operator]
        return want

    def teacher_want(self) -> Want:
        want = Want()
        for p in self.parts.values():
            want = want | p.teacher_want()  # type: ignore[operator]
        return want

    def needs_teacher(self) -> bool:
        return any(p.needs_teacher() for p in self.parts.values())  # type: ignore[operator]

    def needs_probe(self) -> bool:
        return any(p.needs_probe() for p in self.parts.values())  # type: ignore[operator]

    def frozen_models(self) -> list[nn.Module]:
        return [m for p in self.parts.values() for m in p.frozen_models()]  # type: ignore[operator]

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        values = {k: p(inputs) for k, p in self.parts.items()}
        # kept (as floats, read only on failure) so a NaN can be traced to its term
        self.last_parts = {k: v.detach() for k, v in values.items()}
        return sum((self.weights[k] * v for k, v in values.items()), torch.zeros(()))


# -- registry --------------------------------------------------------------------------------------

LossFactory = Callable[..., DistillLoss]
_LOSSES: dict[str, LossFactory] = {
    "kd": KDLoss,
    "hidden": HiddenMSELoss,
    "attention": AttentionLoss,
    "cosine": CosineEmbeddingLoss,
}
#: losses defined in other modules, imported on first use
_BUILTIN_MODULES = {
    "ard": "potstill.passes.distill.robust",
    "rslad": "potstill.passes.distill.robust",
    "adaspec": "potstill.passes.distill.selective",
    "cema": "potstill.passes.distill.selective",
}


def register_loss(name: str) -> Callable[[LossFactory], LossFactory]:
    """Decorator: make a loss class/factory available to ``make_loss`` under ``name``."""

    def wrap(factory: LossFactory) -> LossFactory:
        _LOSSES[name] = factory
        return factory

    return wrap


def available_losses() -> list[str]:
    return sorted(set(_LOSSES) | set(_BUILTIN_MODULES))


def _factory(name: str) -> LossFactory:
    if name not in _LOSSES and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _LOSSES:
        raise InputError(f"unknown distillation loss '{name}'; known: {', '.join(available_losses())}")
    return _LOSSES[name]


def _accepted(factory: LossFactory, options: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def make_loss(spec: str | DistillLoss, *, strict: bool = True, **options: Any) -> DistillLoss:
    """A loss from its name (``"kd"``), a sum (``"kd+hidden"``) or an instance (returned as is).

    Options go to every part that accepts them; with ``strict`` a name no part accepts is an error.
    """
    if isinstance(spec, DistillLoss):
        if options:
            raise InputError(f"loss options {sorted(options)} given with a built loss; pass them to its constructor")
        return spec
    names = [n.strip() for n in spec.split("+") if n.strip()]
    if not names:
        raise InputError(f"empty loss specification {spec!r}")
    factories = {n: _factory(n) for n in names}
    used: set[str] = set()
    built: dict[str, DistillLoss] = {}
    for n, f in factories.items():
        kw = _accepted(f, options)
        used |= set(kw)
        built[n] = f(**kw)
    unknown = sorted(set(options) - used)
    if unknown and strict:
        raise InputError(f"loss '{spec}': unknown option(s) {unknown}")
    return built[names[0]] if len(built) == 1 else SumLoss(built)
