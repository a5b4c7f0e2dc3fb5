"""Healing after depth pruning: a least-squares refit of the block that follows a removed run.

Removing blocks ``l .. l+n-1`` feeds block ``l+n`` the stream ``h_l`` instead of ``h_{l+n}``. Gromov
et al. (arXiv 2403.17887) heal with QLoRA fine-tuning; retraining-free, we refit the Linear layers of
that next block, in execution order, so that each reproduces what the teacher's layer computed:

    W' = argmin_W  sum_t ||W x_t + b - y_t||^2 + lam ||W - W_0||^2
       = (Y~^T X + lam W_0) (X^T X + lam I)^{-1},        Y~ = Y - b

with ``x_t`` the layer's input in the *pruned* model (earlier layers of the block already refitted),
``y_t`` the teacher layer's output on the same token, over the tokens the attention mask keeps, and
``lam = ridge * mean diag(X^T X)``. The first layers (Llama's q/k/v, read through the block's input
norm) absorb the changed stream; the later ones (o, gate/up, down) correct what remains. The ridge
pulls toward the teacher's weights, so with a small calibration set the refit cannot drift far.
Whether the healed student is kept is decided by held-out perplexity (``decoder``), never assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from potstill.inputs.data import Batch
from potstill.ir.layerwise import StopForward, run_hooked
from torch import nn


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _capture(model: nn.Module, block: nn.Module, names: Sequence[str], batch: Batch, what: str) -> dict[str, torch.Tensor]:
    """Inputs (``what="in"``) or outputs (``"out"``) of the named Linears of ``block`` on ``batch``;
    the forward pass stops at the end of the block."""
    mask = batch.kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            got[name] = _masked((args[0] if what == "in" else out).detach().double(), mask)

        handles.append(block.get_submodule(name).register_forward_hook(hook))

    def stop(_m: nn.Module, _a: tuple[Any, ...], _o: Any) -> None:
        raise StopForward

    handles.append(block.register_forward_hook(stop))
    run_hooked(model, batch, handles)
    return got


def refit_block(teacher: nn.Module, teacher_block: nn.Module, student: nn.Module, student_block: nn.Module,
                batches: Sequence[Batch], ridge: float = 1e-2) -> list[str]:
    """Refit every Linear of ``student_block`` (in place of its Parameters: new tensors, never written
    into shared storage) to reproduce ``teacher_block``'s Linears; returns the refitted names."""
    mine = {n: m for n, m in student_block.named_modules() if isinstance(m, nn.Linear)}
    theirs = {n: m for n, m in teacher_block.named_modules() if isinstance(m, nn.Linear)}
    # a Linear whose outputs were pruned (a narrower q_proj or up_proj) has no teacher target per output
    names = [n for n, m in mine.items() if n in theirs and m.weight.shape[0] == theirs[n].weight.shape[0]]
    targets = [_capture(teacher, teacher_block, names, b, "out") for b in batches]
    done = []
    for name in names:
        lin = student_block.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            continue
        w0 = lin.weight.detach().double()
        b0 = lin.bias.detach().double() if lin.bias is not None else None
        gram = torch.zeros(w0.shape[1], w0.shape[1], dtype=torch.float64)
        cross = torch.zeros(w0.shape[0], w0.shape[1], dtype=torch.float64)
        for b, target in zip(batches, targets):
            x = _capture(student, student_block, [name], b, "in")[name]
            y = target[name] - (b0 if b0 is not None else 0.0)
            if x.shape[0] != y.shape[0]:
                continue  # the two models masked a different number of tokens: nothing to pair
            gram += x.T @ x
            cross += y.T @ x
        lam = ridge * float(gram.diagonal().mean()) + 1e-12
        eye = torch.eye(gram.shape[0], dtype=torch.float64)
        w = torch.linalg.solve(gram + lam * eye, (cross + lam * w0).T).T
        if not torch.isfinite(w).all():
            continue
        lin.weight = nn.Parameter(w.to(lin.weight.dtype), requires_grad=lin.weight.requires_grad)
        done.append(name)
    return done
