"""Fisher importance of unit masks (Kwon et al. 2022): how much the loss curves if a unit is dropped.

Put a mask ``m_u`` (1 = kept) on every unit of a group where its channels enter their consumers
(the input of an FFN down projection, of an attention output projection, of the next conv). For
one sample ``b`` the mask gradient is, by the chain rule at ``m = 1``,

    g_b(u) = dL_b/dm_u = sum_{sites} sum_{t, c in u} a_{b,t,c} * dL/da_{b,t,c}

(``t``: tokens / pixels, padding left out). The empirical Fisher of the masks is ``F = sum_b g_b
g_b^T``; dropping the set ``P`` of units costs, to second order, ``dL ~ 1/2 1_P^T F 1_P``
(the first-order term vanishes at a converged model). The score of a unit is the diagonal,

    s(u) = F_uu = sum_b g_b(u)^2,

which is on one scale for every group (it is a loss change), so ``prune.width`` compares it across
groups without normalising. The per-sample vectors ``g_b`` are kept (``mask_gradients``) for the
mask rearrangement that uses the off-diagonal of ``F`` within a layer (``passes/prune/allocate.py``).
Kwon, Kim, Mahoney, Hassoun, Keutzer, Gholami, "A Fast Post-Training Pruning Framework for
Transformers" (NeurIPS 2022), §4.1; their code sums per mini-batch, here per sample.

The loss is the task loss when batches carry targets, else the sampled-target loss of
``gradients.py`` (then ``F`` is the true Fisher / Gauss-Newton matrix of the output). Groups whose
channels reach no consumer input that can be hooked (the hidden size, read through norms) fall back
to the diagonal Fisher of their weights, ``sum_i E[(dL/dw_i)^2]`` (PSMT, arXiv 2407.02253).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from potstill.inputs.data import Batch
from potstill.state import CompileState
from torch import nn

from .activation import activation_sites, channel_dim
from .base import DEFAULT_CALIB_BATCHES, ImportanceEstimator, estimator, resolve
from .gradients import for_each_gradient
from .taylor import weight_gradient_scores

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis, CoupledGroup

#: ``state.records`` key of the last per-sample mask gradients (for mask rearrangement)
MASK_GRADS_KEY = "_mask_gradients"


def _unit_index(group: CoupledGroup, member: Any, n_channels: int) -> torch.Tensor:
    """For each channel of the site, the unit it belongs to (-1 when outside the group)."""
    idx = torch.full((n_channels,), -1, dtype=torch.long)
    for u in range(group.n_units):
        idx[torch.tensor(list(group.positions(member, [u])), dtype=torch.long)] = u
    return idx


def mask_gradients(
    model: nn.Module,
    teacher: nn.Module | None,
    groups: Sequence[CoupledGroup],
    data: Sequence[Batch],
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Per-sample mask gradients ``[samples, units]`` of every group with hookable consumer inputs."""
    modules = dict(model.named_modules())
    # site module -> [(group id, unit index per channel, channel dim)]
    sites: dict[str, list[tuple[int, int, torch.Tensor, int]]] = {}
    for g in groups:
        for name, io, member in activation_sites(model, g):
            mod = modules[name]
            cdim = channel_dim(mod, io)
            if io != "in" or cdim is None:
                continue
            n = int(mod.weight.shape[1]) if isinstance(mod, (nn.Linear, nn.Conv2d)) else 0  # type: ignore[index]
            if n == 0:
                continue
            sites.setdefault(name, []).append((g.id, g.n_units, _unit_index(g, member, n), cdim))
    per_batch: dict[int, list[torch.Tensor]] = {e[0]: [] for v in sites.values() for e in v}
    current: dict[int, torch.Tensor] = {}
    mask_box: list[torch.Tensor | None] = [None]
    handles = []
    for name, entries in sites.items():

        def pre_hook(_m: nn.Module, args: tuple[Any, ...],
                     entries: list[tuple[int, int, torch.Tensor, int]] = entries) -> tuple[Any, ...] | None:
            if not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
                return None
            # a fresh node read by this module only: its gradient is the one through this consumer
            # (the mask sits on this input), not through every other reader of the same tensor
            x = args[0].view_as(args[0])
            mask = mask_box[0]

            def grad_hook(grad: torch.Tensor, x: torch.Tensor = x) -> None:
                for gid, n_units, unit_of, cdim in entries:
                    prod = (x.detach() * grad).double().movedim(cdim, -1)
                    b, c = prod.shape[0], prod.shape[-1]
                    prod = prod.reshape(b, -1, c)
                    if mask is not None and mask.shape == prod.shape[:2]:
                        prod = prod * mask.to(prod.dtype).unsqueeze(-1)
                    per_channel = prod.sum(1)  # [B, C]
                    inside = unit_of >= 0
                    units = torch.zeros(b, n_units, dtype=torch.float64)
                    units.index_add_(1, unit_of[inside], per_channel[:, inside])
                    current[gid] = current[gid] + units if gid in current else units

            x.register_hook(grad_hook)
            return (x, *args[1:])

        handles.append(modules[name].register_forward_pre_hook(pre_hook))

    def on_gradients() -> None:
        for gid, units in current.items():
            per_batch[gid].append(units)
        current.clear()

    try:
        batches = list(data)
        for i, batch in enumerate(batches):
            m = batch.kwargs.get("attention_mask")
            mask_box[0] = m if isinstance(m, torch.Tensor) and m.dim() == 2 else None
            for_each_gradient(model, teacher, [batch], on_gradients, seed=seed + i, vectors_only=True)
    finally:
        for h in handles:
            h.remove()
    return {gid: torch.cat(v).numpy() for gid, v in per_batch.items() if v}


@estimator
@dataclass(frozen=True)
class FisherImportance(ImportanceEstimator):
    """``importance.fisher{batches=8}``: the diagonal Fisher information of unit masks (Kwon et al.)."""

    name: ClassVar[str] = "fisher"
    comparable: ClassVar[bool] = True

    batches: int = DEFAULT_CALIB_BATCHES
    #: applies to the weight-Fisher fallback only (mask scores are one scale and never normalised)
    normalize: bool = True

    def scores(
        self,
        target: CompileState | nn.Module,
        analysis: Analysis,
        batches: Iterable[Any] | None = None,
    ) -> dict[int, np.ndarray]:
        model, teacher, state = resolve(target)
        data = self.batches_for(target, batches, self.batches)
        groups = analysis.prunable()
        seed = state.seed if state else 0
        grads = mask_gradients(model, teacher, groups, data, seed=seed)
        out = {gid: (g**2).sum(0) for gid, g in grads.items()}
        rest = [g for g in groups if g.id not in out]
        if rest:
            out.update(weight_gradient_scores(model, teacher, rest, data, "fisher", self.normalize, seed=seed))
        if state is not None:
            state.records[MASK_GRADS_KEY] = {"module": id(model), "grads": grads}
        return out
