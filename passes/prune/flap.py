"""FLAP: fluctuation-based structured pruning with bias compensation, retraining-free.

An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models" (AAAI 2024,
arXiv 2312.11983). For every linear layer ``W`` (out x in) that *reads* a pruned unit (an ``"in"``
member of a coupled group: the output projection for heads, the down projection for FFN neurons),
over the calibration tokens ``x_n`` the padding mask keeps,

    mu_c    = mean_n x_{n,c}
    F_c     = 1/(N-1) sum_n (x_{n,c} - mu_c)^2 * ||W_{:,c}||^2          (WIFV: weighted fluctuation)

A unit's score is the mean of ``F_c`` over its channels (a head: its ``head_dim`` channels, summed
over the group's readers). Scores are *standardized per group* (one group is one module of one
layer), ``z = (F - mean F) / std F``, which puts heads and neurons of every layer on one scale:
units are removed in ascending ``z`` across the whole model until the budget is met, so each layer
and module gets its own ratio (FLAP's adaptive structure search, ``AL-AM``).

A removed channel is replaced by its mean: the reader computes ``W_kept x_kept + W_removed mu_removed``,
so its bias becomes

    b' = b + W_{:,removed} mu_removed                                   (bias compensation)

which keeps the layer's mean output exactly (``E[W' x_kept + b'] = E[W x + b]``). Where the reader has
no bias (Llama's ``o_proj`` / ``down_proj``) one is added: ``torch.export``, ONNX and ``load_student``
carry a Linear's bias whether or not the teacher's config mentions it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from potstill.inputs.data import Batch, run_with_masks
from torch import nn

if TYPE_CHECKING:
    from potstill.ir.capture import CoupledGroup, Member


@dataclass
class InputStats:
    """Running mean and unbiased variance of one Linear's input channels (float64, masked tokens)."""

    n: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1, x.shape[-1])
        if self.total is None or self.squares is None:
            self.total, self.squares = x.sum(0), (x * x).sum(0)
        else:
            self.total += x.sum(0)
            self.squares += (x * x).sum(0)
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        if self.total is None or self.n == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return self.total / self.n

    @property
    def var(self) -> torch.Tensor:
        if self.squares is None or self.n < 2:
            raise RuntimeError("FLAP needs at least two calibration tokens per layer")
        return ((self.squares - self.n * self.mean**2) / (self.n - 1)).clamp_min(0.0)


def _kept_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` [B, S, C] restricted to the positions the attention mask keeps (all when no mask fits)."""
    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def reader_members(model: nn.Module, group: CoupledGroup) -> list[Member]:
    """The group's ``"in"`` members on ``nn.Linear`` weights (the layers that read its units)."""
    modules = dict(model.named_modules())
    return [m for m in group.members
            if m.role == "in" and m.dim == 1 and m.param.endswith("weight")
            and isinstance(modules.get(m.module), nn.Linear)]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    lin = model.get_submodule(name)
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"{name} is not a Linear")
    return lin.weight.detach().double()


def input_stats(model: nn.Module, names: Sequence[str], batches: Sequence[Batch]) -> dict[str, InputStats]:
    """Mean / variance of the inputs of the named Linear modules over the batches' kept tokens."""
    stats = {n: InputStats() for n in names}
    current: dict[str, torch.Tensor | None] = {"mask": None}
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            stats[name].add(_kept_tokens(args[0], current["mask"]))

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run_with_masks(model, batches, lambda mask: current.__setitem__("mask", mask))
    finally:
        for h in handles:
            h.remove()
    return stats


@dataclass
class FlapScores:
    """Standardized per-unit scores per group id, the raw fluctuations, and the statistics used."""

    z: dict[int, np.ndarray] = field(default_factory=dict)
    raw: dict[int, np.ndarray] = field(default_factory=dict)
    stats: dict[str, InputStats] = field(default_factory=dict)


def flap_scores(model: nn.Module, groups: Sequence[CoupledGroup], batches: Sequence[Batch]) -> FlapScores:
    """WIFV per unit, standardized within each group (see the module docstring)."""
    readers = {g.id: reader_members(model, g) for g in groups}
    names = sorted({m.module for ms in readers.values() for m in ms})
    stats = input_stats(model, names, batches)
    out = FlapScores(stats=stats)
    for g in groups:
        per_unit = np.zeros(g.n_units)
        for m in readers[g.id]:
            w = _weight(model, m.module)
            fluct = (stats[m.module].var * (w * w).sum(0)).cpu().numpy()
            for u in range(g.n_units):
                per_unit[u] += float(np.mean(fluct[g.positions(m, [u])]))
        out.raw[g.id] = per_unit
        sd = float(per_unit.std())
        out.z[g.id] = (per_unit - per_unit.mean()) / sd if sd > 0 else np.zeros_like(per_unit)
    return out


def rank_scores(groups: Sequence[CoupledGroup], z: Mapping[int, np.ndarray],
                costs: Mapping[int, float]) -> dict[int, np.ndarray]:
    """Scores that make ``allocate(..., comparable=True)`` remove units in ascending ``z`` across all
    groups (FLAP's global order): it ranks by ``score / (cost / mean cost)``, so the cost is put back in."""
    low = min((float(v.min()) for v in z.values() if v.size), default=0.0)
    mean_cost = float(np.mean(list(costs.values()))) or 1.0
    return {g.id: (z[g.id] - low + 1.0) * (costs[g.id] / mean_cost) for g in groups}


def compensate_bias(new: nn.Module, groups: Sequence[CoupledGroup], keep: Mapping[int, Sequence[int]],
                    source: nn.Module, stats: Mapping[str, InputStats]) -> list[str]:
    """Fold the removed channels' mean contribution into each reader's bias in ``new`` (the pruned copy
    of ``source``, same module names); returns the modules changed. Biases are new Parameters, never
    written in place (``new`` shares unsliced tensors with ``source``)."""
    shift: dict[str, torch.Tensor] = {}
    for g in groups:
        kept = keep.get(g.id)
        if kept is None:
            continue
        removed = sorted(set(range(g.n_units)) - set(kept))
        if not removed:
            continue
        for m in reader_members(source, g):
            if m.module not in stats:
                continue
            idx = torch.tensor(g.positions(m, removed), dtype=torch.long)
            w = _weight(source, m.module)
            delta = w.index_select(1, idx) @ stats[m.module].mean.index_select(0, idx)
            shift[m.module] = shift.get(m.module, 0) + delta
    for name, delta in shift.items():
        lin = new.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            continue
        base = lin.bias.detach().double() if lin.bias is not None else torch.zeros_like(delta)
        lin.bias = nn.Parameter((base + delta).to(lin.weight.dtype), requires_grad=lin.weight.requires_grad)
    return sorted(shift)
