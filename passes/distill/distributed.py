"""torch.distributed for distillation: process groups, data sharding, gradient averaging.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the trainer joins a process
group (gloo on CPU, NCCL on CUDA) and wraps its students in DistributedDataParallel. Each rank
reads the same seeded stream of batches and keeps its shard — like ``DistributedSampler`` but
for any iterable:

* ``split`` (default): rank r takes rows ``[r·n/W, (r+1)·n/W)`` of every batch, so the *global*
  batch is the user's batch; its loss is scaled by ``W · n_r / n`` so that DDP's gradient average
  equals the gradient of the full-batch mean (``Σ_r n_r/n · ∇L_r``);
* ``batches``: rank r takes batches r, r+W, r+2W, … (global batch = W × the user's batch).

Parameters outside DDP (a loss's learned projections) get their gradients averaged by hand.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from potstill.inputs.data import Batch
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: torch.device | None = None) -> DistContext:
    """Join the process group torchrun describes (idempotent); single process otherwise."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if not launched_distributed():
        return DistContext()
    use_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _slice(x: Any, lo: int, hi: int, n: int) -> Any:
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n:
        return x[lo:hi]
    return x


def shard_batch(batch: Batch, ctx: DistContext) -> tuple[Batch, float]:
    """This rank's rows of ``batch`` and the factor ``W · n_r / n`` its mean loss is scaled by."""
    if not ctx.enabled:
        return batch, 1.0
    n = batch.size
    lo, hi = ctx.rank * n // ctx.world_size, (ctx.rank + 1) * n // ctx.world_size
    part = Batch(
        tuple(_slice(a, lo, hi, n) for a in batch.args),
        {k: _slice(v, lo, hi, n) for k, v in batch.kwargs.items()},
        _slice(batch.target, lo, hi, n),
    )
    return part, ctx.world_size * (hi - lo) / max(n, 1)


def shard_batches(items: Iterable[Any], ctx: DistContext) -> Iterator[Any]:
    """Every ``world_size``-th item, starting at this rank (the ``batches`` mode)."""
    for i, item in enumerate(items):
        if i % ctx.world_size == ctx.rank:
            yield item


def average_gradients(params: Iterable[nn.Parameter], ctx: DistContext) -> None:
    if not ctx.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= ctx.world_size


def broadcast_parameters(params: Iterable[nn.Parameter], ctx: DistContext) -> None:
    if not ctx.enabled:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def step_health(loss: torch.Tensor, grad_norm: torch.Tensor, ctx: DistContext) -> tuple[float, bool, bool]:
    """(mean loss over ranks, any rank's loss NaN/inf, gradient norm NaN/inf) in one read and one
    all-reduce, so every rank takes the same decision (a rank that raised alone would leave the
    others waiting forever)."""
    finite = torch.isfinite(loss)
    flags = torch.stack([torch.where(finite, loss.float(), 0.0), (~finite).float(),
                         (~torch.isfinite(grad_norm.float())).float()])  # fmt: skip
    if ctx.enabled:
        dist.all_reduce(flags)
    total, bad_loss, bad_grad = flags.tolist()
    return total / ctx.world_size, bad_loss > 0, bad_grad > 0


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (a decision all ranks must take alike, e.g. a spent time budget)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
