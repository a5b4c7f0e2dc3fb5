"""Least-squares reconstruction: after pruning, refit the layers that *consume* the pruned units.

A linear consumer computes ``y = W x + b`` on an input whose channels ``x`` are the pruned group's
units. Keeping only channels ``K``, the best replacement in the least-squares sense over the
calibration tokens is, with ``x~ = [x; 1]`` and ``G = sum_tokens x~ x~^T`` (padding masked out),

    [W'_K  b'] = [W  b] G[:, K+1] (G[K+1, K+1] + lambda I)^-1         (ridge lambda, relative to diag)

i.e. the kept channels and the bias absorb what the dropped ones contributed (their mean goes to
the bias, their correlated part to the kept weights). Closed form, one Gram matrix per consumer,
no gradient steps: the "mask tuning" of Kwon et al., "A Fast Post-Training Pruning Framework for
Transformers" (NeurIPS 2022), and the bias compensation of FLAP (An et al., AAAI 2024).

Applied where a group owns a consumer's whole input and the consumer is linear over channels (an
``nn.Linear`` or a 1x1 stride-1 conv): FFN neurons (the down projection), attention heads (the
output projection), inverted-residual expansions (the projection conv) -- not the hidden size,
whose consumers also see the norms' statistics change. A consumer without a bias moves the correction
into the BatchNorm reading its output (``running_mean -= b'``), or refits its weights alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from potstill.data import Batch
from torch import nn

if TYPE_CHECKING:
    from potstill.ir import Analysis


def _is_pointwise(mod: nn.Module | None) -> bool:
    """A 1x1, stride-1, ungrouped conv: a linear map over channels at every pixel."""
    return (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.stride == (1, 1)
            and mod.groups == 1 and mod.padding in ((0, 0), "valid"))


def _in_features(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else int(mod.in_channels)  # type: ignore[arg-type]


def consumers(model: nn.Module, analysis: Analysis, group_ids: Iterable[int]) -> dict[str, int]:
    """Linear / pointwise-conv modules whose whole input is one group's channels: name -> group id."""
    modules = dict(model.named_modules())
    found: dict[str, int] = {}
    for gid in group_ids:
        g = analysis.groups[gid]
        if g.kind == "hidden":
            continue
        for m in g.members:
            mod = modules.get(m.module)
            if mod is None or not (isinstance(mod, nn.Linear) or _is_pointwise(mod)):
                continue
            if (m.role == "in" and m.dim == 1 and m.param == f"{m.module}.weight"
                    and m.offset == 0 and g.n_units * m.unit_len == _in_features(mod)):
                found[m.module] = gid
    return found


def collect_grams(model: nn.Module, names: Iterable[str], batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """``sum x~ x~^T`` of each named linear's input over the batches' non-padding tokens (float64)."""
    grams: dict[str, torch.Tensor] = {}
    mask_box: list[torch.Tensor | None] = [None]
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0].detach().double()
            if x.dim() == 4:  # pointwise conv: channels last, every pixel a sample
                x = x.permute(0, 2, 3, 1)
            mask = mask_box[0]
            if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1])
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
            g = x.T @ x
            grams[name] = grams[name] + g if name in grams else g

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                m = b.kwargs.get("attention_mask")
                mask_box[0] = m if isinstance(m, torch.Tensor) and m.dim() == 2 else None
                b.run(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return grams


def following_batchnorms(model: nn.Module, names: Iterable[str], batch: Batch) -> dict[str, nn.Module]:
    """For each named module, the BatchNorm that reads its output directly (found by tensor identity)."""
    produced: dict[int, str] = {}
    found: dict[str, nn.Module] = {}
    handles = []
    for name in names:

        def out_hook(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
            produced[id(out)] = name

        handles.append(model.get_submodule(name).register_forward_hook(out_hook))
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:

            def bn_hook(m: nn.Module, args: tuple[Any, ...]) -> None:
                if args and id(args[0]) in produced:
                    found.setdefault(produced[id(args[0])], m)

            handles.append(mod.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            batch.run(model)
    finally:
        for h in handles:
            h.remove()
    return found


def refit(linear: nn.Module, gram: torch.Tensor, kept: Sequence[int], ridge: float = 1e-3,
          bias_sink: nn.Module | None = None) -> None:
    """Overwrite a linear / pointwise conv's kept input columns and bias with the least-squares
    solution (in place; the dropped columns are left for the surgery to remove)."""
    n_in = _in_features(linear)
    weight: torch.Tensor = linear.weight  # type: ignore[assignment]
    bias: torch.Tensor | None = linear.bias  # type: ignore[assignment]
    # without a bias the correction goes into the BatchNorm that follows (its running mean), else
    # the constant column is left out: the slicing surgery would not know a new parameter
    with_bias = bias is not None or bias_sink is not None
    idx = torch.tensor([*kept, n_in] if with_bias else list(kept), dtype=torch.long)
    w = weight.detach().double().reshape(weight.shape[0], n_in)
    b0 = bias.detach().double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    wb = torch.cat([w, b0[:, None]], 1) if with_bias else w
    rows = torch.arange(wb.shape[1])
    g_kk = gram[idx][:, idx]
    lam = ridge * float(torch.diagonal(g_kk).mean())
    rhs = wb @ gram[rows][:, idx]  # [out, |K| (+1)]
    sol = torch.linalg.solve(g_kk + lam * torch.eye(len(idx), dtype=g_kk.dtype), rhs.T).T
    n_kept = len(kept)
    with torch.no_grad():
        new_w = weight.detach().clone().reshape(weight.shape[0], n_in)
        new_w[:, idx[:n_kept]] = sol[:, :n_kept].to(new_w.dtype)
        weight.copy_(new_w.reshape(weight.shape))
        if bias is not None:
            bias.copy_(sol[:, -1].to(bias.dtype))
        elif bias_sink is not None:
            mean: torch.Tensor = bias_sink.running_mean  # type: ignore[assignment]
            mean.sub_(sol[:, -1].to(mean.dtype))


def reconstruct(model: nn.Module, analysis: Analysis, keep: Mapping[int, Sequence[int]],
                batches: Sequence[Batch], ridge: float = 1e-3) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose consumers of the pruned groups are refitted for ``keep``."""
    import copy

    targets = consumers(model, analysis, keep)
    if not targets:
        return model, []
    grams = collect_grams(model, targets, batches)
    new = copy.deepcopy(model)
    no_bias = [n for n in targets if getattr(new.get_submodule(n), "bias", None) is None]
    sinks = following_batchnorms(new, no_bias, batches[0]) if no_bias and batches else {}
    done = []
    for name, gid in targets.items():
        g = analysis.groups[gid]
        member = next(m for m in g.members if m.module == name and m.role == "in")
        kept = g.positions(member, keep[gid])
        lin = new.get_submodule(name)
        if name in grams:
            refit(lin, grams[name], kept, ridge, sinks.get(name))
            done.append(name)
    return new, done
