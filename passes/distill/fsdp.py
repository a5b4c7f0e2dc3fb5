"""FSDP2 for students too large to train whole on one device: each rank keeps a shard of every tensor.

``torch.distributed.fsdp.fully_shard`` (FSDP2, per-parameter sharding over ``DTensor``) splits
every parameter along dim 0 across the ranks; a sharded module all-gathers a block's parameters
just before its forward and backward and frees them after, and reduce-scatters the gradients
(averaged), so parameters, gradients and optimizer state each take ``1/world`` of their size per
rank, plus one block's gathered parameters (Zhao et al., "PyTorch FSDP", arXiv 2304.11277).
Sharding each repeated block first and the root last makes those the units of gathering.

It runs on CPU with gloo as well as on CUDA with NCCL (checked with torch 2.13). The teacher is not
sharded here: it is frozen, so it can run replicated in bf16, or be replaced by a
``teacher_cache.TeacherCache``.

    student = shard_student(student)          # under torchrun, after init_process_group
    ... train: loss.backward(); optimizer.step() ...
    state = full_state_dict(student)          # the whole weights, on every rank
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The items of the model's largest ``nn.ModuleList`` (a transformer's layers), else its children."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if lists:
        sizes = [sum(p.numel() for p in m.parameters()) for m in lists]
        return list(lists[sizes.index(max(sizes))])
    return [c for c in module.children() if any(True for _ in c.parameters())]


def shard_student(module: nn.Module, blocks: list[nn.Module] | None = None, *, reshard_after_forward: bool = True) -> nn.Module:
    """Apply ``fully_shard`` to each block (``repeated_blocks`` by default) and then to ``module``.

    Needs an initialised process group; returns ``module`` (now an ``FSDPModule``), sharded in place.
    """
    from torch.distributed.fsdp import fully_shard

    for block in repeated_blocks(module) if blocks is None else blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(module, reshard_after_forward=reshard_after_forward)
    return module


def full_state_dict(module: nn.Module) -> dict[str, Any]:
    """The unsharded weights (``DTensor.full_tensor``) on every rank, for saving or comparing."""
    out: dict[str, Any] = {}
    for name, value in module.state_dict().items():
        full = getattr(value, "full_tensor", None)
        out[name] = (full() if callable(full) else value).detach().clone() if isinstance(value, torch.Tensor) else value
    return out
