"""Held-out loss of a model against a reference, for the checks that keep a change only when it helps.

Every retraining-free repair here (a least-squares refit, BatchNorm re-estimation, a width chosen by
sensitivity) is judged on held-out batches that it never read. The loss compares the model's primary
output ``s`` with the reference's ``t`` (the teacher's, computed once and cached):

* logits ``[B, C]`` (classification): ``KL(p_t || p_s)`` averaged over samples, ``p = softmax``
  -- smooth where top-1 agreement on a few dozen samples is not;
* anything else: the relative squared error ``sum ||s - t||^2 / sum ||t||^2`` (padding masked out).

Lower is better; a non-finite output gives ``inf``, so a broken model never wins a comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from potstill.inputs.data import Batch, primary_output
from torch import nn


def _logits(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() == 2 and t.shape[-1] >= 2


@dataclass
class HeldoutReference:
    """The reference's primary outputs on held-out batches, and the loss of any model against them."""

    batches: list[Batch]
    outputs: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def of(cls, reference: nn.Module, batches: Sequence[Batch]) -> HeldoutReference:
        was = reference.training
        reference.eval()
        try:
            outs = [primary_output(b.run(reference)).detach().double() for b in batches]
        finally:
            reference.train(was)
        return cls(list(batches), outs)

    @torch.no_grad()
    def loss(self, model: nn.Module) -> float:
        """KL for logits, else relative squared error (module docstring); ``inf`` if not finite."""
        was = model.training
        model.eval()
        num = den = 0.0
        n = 0
        try:
            for b, t in zip(self.batches, self.outputs):
                s = primary_output(b.run(model)).double()
                if not bool(torch.isfinite(s).all()):
                    return math.inf
                if _logits(t):
                    lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
                    num += float((lt.exp() * (lt - ls)).sum())
                    n += t.shape[0]
                    continue
                mask = b.kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.dim() == 2 and s.shape[:2] == mask.shape:
                    s, t = s[mask.bool()], t[mask.bool()]
                num += float(((s - t) ** 2).sum())
                den += float((t**2).sum())
        finally:
            model.train(was)
        if n:
            return num / n
        return num / den if den > 0 else math.inf


def as_batches(items: Any) -> list[Batch]:
    from potstill.inputs.data import as_batch

    return [as_batch(b) for b in items]
