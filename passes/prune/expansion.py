"""Expansion-only pruning of inverted-residual blocks, allocated by measured sensitivity.

An inverted-residual block (MobileNetV2, EfficientNet) computes ``x + P(dw(E(x)))``: a pointwise
expansion ``E`` to ``t*c`` channels, a depthwise conv, and a pointwise projection ``P`` back to
``c``. The ``c`` channels are the residual stream, shared by every block of a stage and by the
adds; the ``t*c`` expansion channels live inside one block. Pruning an expansion channel removes
one row of ``E``, one depthwise filter and one column of ``P``, and leaves every other activation of
the block as it was, so the only error is in ``P``'s output -- which least squares repairs (He et
al., "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017; ThiNet, Luo et al.
2017). The residual widths stay whole (``scope=expansion``, the default for such models).

**Which channels.** With ``a`` the projection's input (one sample per pixel), ``G = sum a~ a~^T``
(``a~ = [a; 1]``, ridge ``lambda``) and ``W`` the projection's weights scaled per output row by the
following BatchNorm (``gamma / sigma``: what reaches the residual add), dropping input ``j`` from the
kept set and refitting the others costs (Optimal Brain Surgeon, Hassibi & Stork 1993)

    dE_j = ||W_:j||^2 / [H^-1]_jj,     then  W <- W - W_:j H^-1_j: / H^-1_jj,  H^-1 <- H^-1 - H^-1_:j H^-1_j: / H^-1_jj

Removing the cheapest channel again and again (backward elimination) gives an *order*, so every
width keeps a prefix of it, and ``e(k)``, the summed ``dE`` when ``k`` channels are left, is the
exact least-squares error of the projection at that width (the bias column is never dropped).

**How many per block** (NetAdapt, Yang et al. 2018; AMC, He et al. 2018): each block is pruned
*alone* at a probe width (half its channels), its projection refitted in closed form
(``W_K = W G_:K (G_KK + lambda I)^-1``: the block's input is the teacher's, so this is exact), and
the held-out loss of the whole model is measured (``heldout.py``: KL of the logits). That gives a
gain ``gamma_b = loss_b / e_b(probe)``, and the predicted loss of width ``k`` is ``gamma_b e_b(k)``.
The cost of a width is the budget's measure (predicted MACs, or latency from the profile's table
or roofline). Widths are then bought greedily by the smallest loss added per unit of cost saved
over the aligned candidate widths of every block until the budget is met -- a multiple-choice
knapsack solved on each block's lower convex hull (``allocate.sensitivity_allocate``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from potstill.inputs.data import Batch
from torch import nn

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis, CoupledGroup


@dataclass(frozen=True)
class Expansion:
    """An expansion group: its id, the depthwise conv inside it, the projection reading it, and
    the BatchNorm after the projection (None: none)."""

    group: int
    depthwise: str
    projection: str
    norm: str | None


def _is_depthwise(mod: nn.Module | None) -> bool:
    return (isinstance(mod, nn.Conv2d) and mod.groups > 1
            and mod.groups == mod.in_channels == mod.out_channels)  # fmt: skip


def expansion_groups(model: nn.Module, analysis: Analysis, groups: Sequence[CoupledGroup]) -> list[Expansion]:
    """The groups among ``groups`` that are the inside of an inverted-residual block: one producer
    side that runs through a depthwise conv, and one pointwise (ungrouped) conv reading them all."""
    from .reconstruct import consumers

    modules = dict(model.named_modules())
    found: list[Expansion] = []
    for g in groups:
        dw = sorted({m.module for m in g.members if m.role == "out" and m.dim == 0 and _is_depthwise(modules.get(m.module))})
        readers = {m.module for m in g.members if m.role == "in"}
        cons = consumers(model, analysis, [g.id], spatial=True)
        if len(dw) != 1 or len(readers) != 1 or set(cons) != readers:
            continue
        (proj,) = readers
        found.append(Expansion(g.id, dw[0], proj, _norm_after(model, proj)))
    return found


def _norm_after(model: nn.Module, name: str) -> str | None:
    """The BatchNorm sibling whose width is the projection's output (the module after it, by naming)."""
    parent_name, _, _ = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    conv = model.get_submodule(name)
    children = list(parent.named_children())
    names = [n for n, _ in children]
    leaf = name.rpartition(".")[2]
    if leaf not in names:
        return None
    for n, c in children[names.index(leaf) + 1:]:
        if (isinstance(c, nn.modules.batchnorm._BatchNorm) and c.running_var is not None
                and c.num_features == conv.out_channels):  # type: ignore[union-attr]
            return f"{parent_name}.{n}" if parent_name else n
    return None


def input_grams(model: nn.Module, names: Sequence[str], batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """``sum a~ a~^T`` of each named pointwise conv's input (pixels as samples, ones appended)."""
    from .reconstruct import collect_grams

    return collect_grams(model, names, batches)


def scaled_weight(model: nn.Module, exp: Expansion) -> torch.Tensor:
    """The projection's ``[out, in]`` weights scaled per row by its BatchNorm's ``gamma / sigma``."""
    w = _weight(model, exp.projection)
    if exp.norm is not None:
        bn = model.get_submodule(exp.norm)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_var is not None
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * scale[:, None]
    return w


def obs_order(w: torch.Tensor, gram: torch.Tensor, ridge: float = 1e-4) -> tuple[list[int], np.ndarray]:
    """Greedy OBS backward elimination (module docstring) over the input channels of ``w`` (``[out,
    C]``) with the ``(C+1)``-square Gram ``gram`` (last row/column: the ones).

    Returns the channels in removal order (first removed first) and ``e``, where ``e[i]`` is the
    error after removing the first ``i`` of them (``e[0] = 0``).
    """
    n = w.shape[1]
    h = gram.double().clone()
    h += ridge * float(torch.diagonal(h).mean()) * torch.eye(n + 1, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    wc = torch.cat([w.double(), torch.zeros(w.shape[0], 1, dtype=torch.float64)], 1)
    alive = torch.ones(n + 1, dtype=torch.bool)
    order: list[int] = []
    err = np.zeros(n)
    for i in range(n - 1):
        d = torch.diagonal(hinv).clamp_min(1e-30)
        cost = (wc**2).sum(0) / d
        cost[~alive] = float("inf")
        cost[n] = float("inf")  # the bias column is never removed
        j = int(torch.argmin(cost))
        err[i + 1] = err[i] + float(cost[j])
        wc -= torch.outer(wc[:, j] / hinv[j, j], hinv[j, :])
        hinv -= torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
        alive[j] = False
        wc[:, j] = 0.0
        order.append(j)
    order += [int(i) for i in torch.nonzero(alive[:n]).flatten()]
    return order, err


def order_scores(order: Sequence[int]) -> np.ndarray:
    """Scores (higher = keep) that make every top-k a prefix of the kept end of ``order``."""
    s = np.zeros(len(order))
    for rank, j in enumerate(order):
        s[j] = rank + 1
    return s


def refit_closed_form(w: torch.Tensor, gram: torch.Tensor, kept: Sequence[int],
                      ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``[W_K, b] = W G_:K~ (G_K~K~ + lambda I)^-1`` with ``K~ = K + [ones]``: the least-squares
    projection from the kept channels (and a bias) when the input is the teacher's own."""
    n = w.shape[1]
    cols = torch.tensor([*kept, n], dtype=torch.long)
    g = gram.double()
    sub = g[cols][:, cols]
    lam = ridge * float(torch.diagonal(sub).mean())
    wb = torch.cat([w.double(), torch.zeros(w.shape[0], 1, dtype=torch.float64)], 1)
    sol = torch.linalg.solve(sub + lam * torch.eye(len(cols), dtype=g.dtype), (wb @ g[:, cols]).T).T
    return sol[:, :-1], sol[:, -1]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    """A conv's weights as ``[out, in * taps]`` float64."""
    weight = model.get_submodule(name).weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach().double().reshape(weight.shape[0], -1)


@torch.no_grad()
def apply_refit(model: nn.Module, exp: Expansion, w: torch.Tensor, b: torch.Tensor) -> None:
    """Write ``w`` (unscaled ``[out, kept]``) into the projection and ``b`` into it or its BatchNorm."""
    conv = model.get_submodule(exp.projection)
    weight: torch.Tensor = conv.weight  # type: ignore[assignment]
    weight.copy_(w.reshape(weight.shape).to(weight.dtype))
    bias: torch.Tensor | None = conv.bias  # type: ignore[assignment]
    if bias is not None:
        bias.add_(b.to(bias.dtype))
    elif exp.norm is not None:
        bn = model.get_submodule(exp.norm)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None
        bn.running_mean = bn.running_mean - b.to(bn.running_mean.dtype)


def candidate_widths(n: int, step: int, smallest: float = 0.25) -> list[int]:
    """Aligned widths from ``n`` down to ``smallest * n`` (at least one step), every one of them."""
    from .sensitivity import candidate_widths as below

    return [n, *below(n, step, smallest, most=n)]


@dataclass
class Curve:
    """A block's options: kept width -> (predicted held-out loss, cost saved)."""

    group: int
    widths: list[int]
    loss: list[float]
    saved: list[float]


def probe_gains(model: nn.Module, analysis: Analysis, exps: Sequence[Expansion], grams: Mapping[str, torch.Tensor],
                orders: Mapping[int, list[int]], errors: Mapping[int, np.ndarray], heldout: Sequence[Batch],
                step: int, probe: float = 0.5) -> dict[int, float]:  # fmt: skip
    """``gamma_b``: held-out loss of the model with only block ``b`` pruned to ``probe`` of its
    channels (refitted), over the block's OBS error there (module docstring)."""
    from potstill.ir.surgery import prune_width

    from .heldout import HeldoutReference

    ref = HeldoutReference.of(model, heldout)
    gains: dict[int, float] = {}
    for exp in exps:
        n = analysis.groups[exp.group].n_units
        k = max(step, round(probe * n / step) * step)
        if k >= n:
            continue
        kept = sorted(orders[exp.group][n - k:])
        pruned = prune_width(model, analysis, {exp.group: kept})
        from potstill.ir.cow import unshare

        unshare(pruned, model)
        wk, b = refit_closed_form(_weight(model, exp.projection), grams[exp.projection], kept)
        apply_refit(pruned, exp, wk, b)
        loss = ref.loss(pruned)
        e = float(errors[exp.group][n - k])
        gains[exp.group] = loss / e if e > 0 else 0.0
    return gains


@dataclass
class ExpansionPlan:
    """What ``plan_expansions`` decided: kept units per group, scores that order every group's
    channels by the OBS elimination, and the per-block record for the manifest."""

    keep: dict[int, int]
    scores: dict[int, np.ndarray]
    blocks: list[dict[str, object]]


def plan_expansions(model: nn.Module, analysis: Analysis, exps: Sequence[Expansion], fit: Sequence[Batch],
                    heldout: Sequence[Batch], measure: Callable[[Mapping[int, int]], float], limit: float,
                    multiple: int, floor: float = 0.25) -> ExpansionPlan:  # fmt: skip
    """Order each block's channels (``obs_order``), measure each block's gain on held-out data
    (``probe_gains``), and allocate widths under ``measure(keep) <= limit`` (module docstring)."""
    from .align import unit_step
    from .allocate import sensitivity_allocate

    grams = input_grams(model, [e.projection for e in exps], fit)
    orders: dict[int, list[int]] = {}
    errors: dict[int, np.ndarray] = {}
    for e in exps:
        orders[e.group], errors[e.group] = obs_order(scaled_weight(model, e), grams[e.projection])
    full = {e.group: analysis.groups[e.group].n_units for e in exps}
    base = measure(full)
    step = unit_step(1, multiple)
    gains = probe_gains(model, analysis, exps, grams, orders, errors, heldout, step)
    curves: dict[int, list[tuple[int, float, float]]] = {}
    for e in exps:
        n = full[e.group]
        curves[e.group] = [(k, gains.get(e.group, 0.0) * float(errors[e.group][n - k]),
                            base - measure({**full, e.group: k})) for k in candidate_widths(n, step, floor)]  # fmt: skip
    keep = sensitivity_allocate(curves, base - limit)
    blocks = [{"group": e.projection, "of": full[e.group], "units": keep[e.group], "gain": gains.get(e.group),
               "predicted_loss": {k: loss for k, loss, _ in curves[e.group]}.get(keep[e.group])}
              for e in exps]  # fmt: skip
    scores = {g: order_scores(o) for g, o in orders.items()}
    return ExpansionPlan(keep, scores, blocks)
