"""What one distillation run is: its students, its settings, its result, and the batches its steps see.

``TrainConfig`` holds every setting of ``DistillTrainer``; ``step_batches`` lists the batches a run's
steps train on, in order (what a teacher cache must hold). The data order of epoch ``e`` is a pure
function of ``(seed, e)`` (see ``batches``), so a resumed run replays it exactly.

A run stops at whichever comes first: ``epochs`` passes over the data, ``max_steps`` steps, or the
wall-clock budget ``time_budget_s`` (``budget``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from potstill.inputs.data import Batch, as_batch
from torch import nn

from . import distributed as ddp
from .batches import count_batches, epoch_batches
from .capture import ForwardFn

DataSource = Callable[..., Iterable[Any]] | Iterable[Any]


@dataclass
class StudentSpec:
    """A student: a module, or a configuration of one run by ``forward(module, batch, config)``."""

    module: nn.Module
    config: Any = None
    weight: float = 1.0
    forward: ForwardFn | None = None
    name: str = ""


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None
    steps_per_epoch: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on CUDA only)
    seed: int = 0
    device: str | None = None
    inplace: bool = False
    balance: bool = False
    shard: str = "split"  # split | batches
    #: under torchrun: "ddp" (each rank a whole student), "fsdp" (FSDP2: each rank a shard of its
    #: weights, gradients and optimizer state, for students too big for one device), "auto" (DDP
    #: under torchrun, one process otherwise). ddp and fsdp need torchrun with WORLD_SIZE > 1.
    parallel: str = "auto"
    find_unused_parameters: bool = False
    checkpoint_dir: Path | None = None
    #: every this many steps; 0: at the end of each epoch (and always at the end)
    checkpoint_every: int = 0
    keep_checkpoints: int = 1
    resume: bool = False
    log_path: Path | None = None
    log_every: int = 10
    eval_every: int = 0
    eval_limit: int | None = None
    progress: bool = True
    #: the progress bar's label
    progress_label: str = "distill"
    #: identity of the run beyond these settings (the distill pass's spec): part of the fingerprint
    run_key: str = ""
    #: fail when the loss ends above this multiple of its start (``health``); None: do not check
    divergence_factor: float | None = 10.0
    #: stop training once this many seconds of wall clock are spent (None: no budget); the learning
    #: rate schedule then runs on the fraction of the budget spent when that is ahead of the steps
    time_budget_s: float | None = None
    #: the students' dropout while they train (False: dropout and every other train-only behaviour off)
    dropout: bool = True
    #: the students' BatchNorm while they train: "train" (batch statistics; the running ones follow the
    #: data) or "frozen" (the running statistics normalise and stay as they are)
    batchnorm: str = "train"


PARALLEL = ("auto", "ddp", "fsdp")


def not_launched(parallel: str) -> str:
    return (
        f"parallel={parallel} needs several processes under torchrun (WORLD_SIZE > 1), but this is one "
        f"process: launch with 'torchrun --nproc_per_node N ...', or use parallel=auto to train in this process"
    )


#: settings that do not change what a run computes (left out of the resume fingerprint)
NOT_FINGERPRINTED = {"checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "log_path", "log_every",
                     "eval_every", "eval_limit", "progress", "progress_label", "time_budget_s"}  # fmt: skip


@dataclass
class TrainResult:
    steps: int
    epochs: int
    loss: float
    seconds: float
    samples: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    resumed_from: int | None = None
    #: the wall-clock budget ended the run before its epochs or step limit
    stopped_by_budget: bool = False
    #: steps the epochs and step limit allowed (what the run would have done without a budget)
    planned_steps: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def epoch_iter(data: DataSource, c: TrainConfig, dist: ddp.DistContext, epoch: int) -> Iterator[Any]:
    """The raw items this rank trains on in ``epoch``."""
    items = epoch_batches(data, c.seed, epoch)
    return ddp.shard_batches(items, dist) if c.shard == "batches" and dist.enabled else items


def total_steps(data: DataSource, c: TrainConfig, dist: ddp.DistContext) -> int:
    """Steps in the run on this rank (before any time budget)."""
    per_epoch = c.steps_per_epoch or count_batches(data, c.seed)
    if c.shard == "batches" and dist.enabled:
        per_epoch = -(-per_epoch // dist.world_size)
    return min(c.max_steps or per_epoch * c.epochs, per_epoch * c.epochs)


def step_batches(data: DataSource, config: TrainConfig, dist: ddp.DistContext | None = None) -> Iterator[Batch]:
    """Every batch a step of ``DistillTrainer.fit(data)`` with ``config`` trains on, on this rank, in
    order: every epoch (each in its ``(seed, epoch)`` order), up to the step limit, sharded as the
    steps shard it. What a teacher cache (``teacher_cache``) must hold."""
    dist = dist or ddp.init_distributed(torch.device(config.device) if config.device else None)
    total, step = total_steps(data, config, dist), 0
    for epoch in range(config.epochs):
        for raw in epoch_iter(data, config, dist, epoch):
            if step >= total:
                return
            batch = as_batch(raw)
            yield ddp.shard_batch(batch, dist)[0] if config.shard == "split" else batch
            step += 1
