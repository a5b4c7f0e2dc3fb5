"""Optimizers and learning-rate schedules for distillation.

Cosine decay with linear warm-up (Loshchilov & Hutter, SGDR, arXiv 1608.03983; warm-up as in
Goyal et al., arXiv 1706.02677): for step ``s`` of ``S`` with ``W`` warm-up steps,

    lr(s) = lr · s / W                                              for s < W
    lr(s) = lr · (r + (1 − r) · ½ (1 + cos(π (s − W) / (S − W))))   otherwise

where ``r`` is the final fraction of the peak rate (``min_lr_ratio``). Under a wall-clock budget
(``budget``) the decay's progress is the larger of ``(s − W) / (S − W)`` and the budget's spent fraction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from potstill.errors import InputError
from torch import nn


def make_optimizer(
    params: Iterable[nn.Parameter], name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    raise InputError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")


def cosine_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0, spent: float = 0.0) -> float:
    """The multiplier of the peak learning rate at ``step`` (see the module docstring); ``spent``:
    the fraction of a time budget used."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(max(step - warmup, 0) / span, spent), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
    spent: Callable[[], float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``spent()``: the fraction of a time budget used so far (cosine only; None: no budget)."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_factor(s, total_steps, warmup_steps, min_lr_ratio, spent() if spent else 0.0)
        )
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: (s + 1) / warmup_steps if warmup_steps and s < warmup_steps else 1.0
        )
    raise InputError(f"schedule must be 'cosine' or 'constant', got {kind!r}")
