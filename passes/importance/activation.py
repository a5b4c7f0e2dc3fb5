"""Activation importance (Minitron): how strongly calibration data drives each unit.

Forward hooks on calibration batches record, for every activation site ``a`` carrying a group's
channel dim, and every sample ``b``,

    imp_c = sqrt( sum_b ( mean_t |a_{b,t,c}| )^2 )

(``t`` runs over the sequence / spatial positions; padding tokens are left out of the mean when
the batch has an ``attention_mask``). A unit's site score is the L2 norm of ``imp_c`` over its
channels (a head: over its ``head_dim`` channels). Sites, per Minitron (Muralidharan et al.,
"Compact Language Models via Pruning and Knowledge Distillation", arXiv 2407.14679, and
Model Optimizer's ``mcore_minitron``):

* members with role ``"in"``: the *input* of that module (FFN neurons: the input of the down
  projection; heads: the input of the output projection; conv channels: the next conv's input);
* hidden size (a group with members of role ``"norm"`` on LayerNorm/RMSNorm modules): the
  *output* of every such norm, and only those.

Site scores are summed per group; Minitron sums them raw (``normalize=False``, the default).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from potstill.inputs.data import Batch, run_with_masks
from potstill.state import CompileState
from torch import nn

from .base import DEFAULT_CALIB_BATCHES, ImportanceEstimator, aggregate, estimator, per_unit, resolve

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis, CoupledGroup, Member

_LAYER_NORMS = ("LayerNorm", "RMSNorm", "T5LayerNorm")


def _is_layer_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or any(name.endswith(n) for n in _LAYER_NORMS)


def channel_dim(module: nn.Module, io: str) -> int | None:
    """The dim of the site's activation that carries the channels, or None if unknown."""
    if io == "in":
        if isinstance(module, nn.Linear):
            return -1
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
            return 1
        return None
    if _is_layer_norm(module):
        return -1
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return 1
    return None


def activation_sites(model: nn.Module, group: CoupledGroup) -> list[tuple[str, str, Member]]:
    """(module name, "in"|"out", member) for every activation site of ``group`` (deduplicated)."""
    modules = dict(model.named_modules())
    norm_sites = []
    in_sites = []
    seen: set[tuple[str, str, int, int]] = set()
    for m in group.members:
        mod = modules.get(m.module)
        if mod is None:
            continue
        if m.role in ("norm", "other") and m.dim == 0 and _is_layer_norm(mod):
            key = (m.module, "out", m.offset, m.unit_len)
            if key not in seen:
                seen.add(key)
                norm_sites.append((m.module, "out", m))
        elif m.role == "in" and channel_dim(mod, "in") is not None and m.param.endswith("weight"):
            key = (m.module, "in", m.offset, m.unit_len)
            if key not in seen:
                seen.add(key)
                in_sites.append((m.module, "in", m))
    return norm_sites or in_sites


class _SiteStat:
    """Accumulates ``sum_b (mean_t |a_{b,t,c}|)^2`` for one activation site."""

    def __init__(self, channel_dim: int) -> None:
        self.channel_dim = channel_dim
        self.total: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def add(self, a: torch.Tensor) -> None:
        a = a.detach().float().movedim(self.channel_dim, -1)
        b, c = a.shape[0], a.shape[-1]
        a = a.reshape(b, -1, c).abs()
        mask = self.mask
        if mask is not None and mask.shape == a.shape[:2]:
            w = mask.to(a.dtype).unsqueeze(-1)
            mean = (a * w).sum(1) / w.sum(1).clamp_min(1)
        else:
            mean = a.mean(1)
        sq = (mean.double() ** 2).sum(0)
        self.total = sq if self.total is None else self.total + sq

    def imp(self) -> np.ndarray:
        if self.total is None:
            raise RuntimeError("site never ran")
        return self.total.sqrt().cpu().numpy()


def collect_site_stats(
    model: nn.Module, sites: Iterable[tuple[str, str]], batches: Iterable[Batch]
) -> dict[tuple[str, str], np.ndarray]:
    """Run the batches with hooks on the sites; per-channel ``imp_c`` for each site."""
    modules = dict(model.named_modules())
    stats: dict[tuple[str, str], _SiteStat] = {}
    handles = []
    for name, io in set(sites):
        mod = modules[name]
        cdim = channel_dim(mod, io)
        if cdim is None:
            continue
        stat = stats[(name, io)] = _SiteStat(cdim)
        if io == "in":

            def pre_hook(_m: nn.Module, args: tuple[Any, ...], stat: _SiteStat = stat) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    stat.add(args[0])

            handles.append(mod.register_forward_pre_hook(pre_hook))
        else:

            def hook(_m: nn.Module, _args: Any, out: Any, stat: _SiteStat = stat) -> None:
                if isinstance(out, torch.Tensor):
                    stat.add(out)

            handles.append(mod.register_forward_hook(hook))
    def set_mask(mask: torch.Tensor | None) -> None:
        for s in stats.values():
            s.mask = mask

    try:
        run_with_masks(model, batches, set_mask)
    finally:
        for h in handles:
            h.remove()
    return {k: s.imp() for k, s in stats.items() if s.total is not None}


@estimator
@dataclass(frozen=True)
class ActivationImportance(ImportanceEstimator):
    """``importance.activation{batches=8}``: Minitron activation importance (module docstring)."""

    name: ClassVar[str] = "activation"

    batches: int = DEFAULT_CALIB_BATCHES
    normalize: bool = False

    def scores(
        self,
        target: CompileState | nn.Module,
        analysis: Analysis,
        batches: Iterable[Any] | None = None,
    ) -> dict[int, np.ndarray]:
        model, _, _ = resolve(target)
        data = self.batches_for(target, batches, self.batches)
        groups = analysis.prunable()
        sites = {g.id: activation_sites(model, g) for g in groups}
        stats = collect_site_stats(model, [(n, io) for s in sites.values() for n, io, _ in s], data)
        out: dict[int, np.ndarray] = {}
        fallback: list[int] = []
        for g in groups:
            member_scores = [
                per_unit(g, m, stats[(n, io)], reduce="l2") for n, io, m in sites[g.id] if (n, io) in stats
            ]
            out[g.id] = aggregate(member_scores, g.n_units, self.normalize)
            if not member_scores:
                fallback.append(g.id)
        if fallback:
            # groups whose channels reach no activation site we can hook: weight magnitude
            from .magnitude import MagnitudeImportance

            mag = MagnitudeImportance().scores(model, analysis)
            out.update({gid: mag[gid] for gid in fallback})
        return out
