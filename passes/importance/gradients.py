"""The loss behind the gradient estimators (Taylor, Fisher), shared by both.

With targets in the batch it is the task loss: cross-entropy for integer targets (``-100``
ignored, token-level targets flattened), mean squared error for float targets.

Without targets it is the negative log-likelihood of targets *sampled from the teacher's
predictive distribution* (self-distillation with sampled targets):

* outputs that are logits (an output with ``.logits``, or a 2-D ``[batch, classes]`` tensor):
  ``y ~ Categorical(softmax(z_t))``, ``L = CE(z_s, y)``;
* other outputs (hidden states, embeddings): ``y = z_t + sigma * eps``, ``eps ~ N(0, I)``,
  ``sigma = std(z_t)``, ``L = ||z_s - y||^2 / (2 sigma^2 numel)``.

``z_t`` is the teacher's output when its shape matches the student's, else the student's own
detached output. A plain KD loss (``KL(p_t || p_s)``) would have a *zero* gradient while the student
still equals the teacher, so every Taylor/Fisher score would be zero; with sampled targets
``E[g g^T]`` is the true Fisher information (Kunstner et al., NeurIPS 2019) and ``|w * g|`` the
first-order size of the output change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from potstill.inputs.data import Batch, primary_output
from torch import nn


def _is_logits(out: Any, z: torch.Tensor) -> bool:
    return getattr(out, "logits", None) is not None or (z.dim() == 2 and z.shape[-1] > 1)


def sampled_loss(out_s: Any, out_t: Any | None, batch: Batch, gen: torch.Generator) -> torch.Tensor:
    """The loss of one batch (see the module docstring)."""
    z_s = primary_output(out_s).float()
    if batch.target is not None:
        y = batch.target
        if not y.is_floating_point():
            return F.cross_entropy(z_s.reshape(-1, z_s.shape[-1]), y.reshape(-1).long(), ignore_index=-100)
        return F.mse_loss(z_s, y.to(z_s.dtype).reshape(z_s.shape))
    z_t = primary_output(out_t).float().detach() if out_t is not None else None
    if z_t is None or z_t.shape != z_s.shape:
        z_t = z_s.detach()
    if _is_logits(out_s, z_s):
        probs = torch.softmax(z_t.reshape(-1, z_t.shape[-1]), dim=-1)
        y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        return F.cross_entropy(z_s.reshape(-1, z_s.shape[-1]), y)
    sigma = z_t.std().clamp_min(1e-8)
    noise = torch.randn(z_t.shape, generator=gen, dtype=z_t.dtype)
    return ((z_s - (z_t + sigma * noise)) ** 2).sum() / (2 * sigma**2 * z_s.numel())


def for_each_gradient(
    model: nn.Module,
    teacher: nn.Module | None,
    batches: Sequence[Batch],
    on_gradients: Callable[[], None],
    seed: int = 0,
    vectors_only: bool = False,
) -> None:
    """For each batch: forward, the loss, backward, then ``on_gradients()`` reads ``p.grad``.

    ``vectors_only``: only 1-D parameters (biases, norms) require gradients, which is enough for
    every activation after the first norm to carry one (what activation hooks read), without the
    weight-gradient products (a third of the backward pass)."""
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(not vectors_only or p.dim() <= 1)
        for batch in batches:
            out_t = None
            if teacher is not None and teacher is not model:
                with torch.no_grad():
                    out_t = batch.run(teacher)
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                out_s = batch.run(model)
                sampled_loss(out_s, out_t, batch, gen).backward()
            on_gradients()
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
