"""The trainer's checkpoints: what a checkpoint holds, writing it, and resuming only the same run.

A checkpoint records a fingerprint of what the run started from: ``run_key``, the training settings
that change what is computed (``config.NOT_FINGERPRINTED`` are left out), the world size, the loss,
the students' and the teacher's initial weights and the first batch. ``resume=True`` continues only
from a checkpoint with the same fingerprint; others are deleted and the run starts afresh. Under
FSDP a checkpoint holds the full weights and optimizer state (gathering them is collective: every
rank takes part, rank 0 writes). The format is ``checkpoint``'s.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from potstill.inputs.data import as_batch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as ddp
from . import fsdp, health
from .batches import epoch_batches
from .config import NOT_FINGERPRINTED, DataSource, StudentSpec, TrainConfig
from .evaluate import MetricsLog
from .losses import DistillLoss


class CheckpointingMixin:
    """Checkpoint save / restore / resume for ``DistillTrainer`` (which provides these attributes)."""

    config: TrainConfig
    dist: ddp.DistContext
    students: list[StudentSpec]
    modules: list[nn.Module]
    teacher: nn.Module | None
    loss: DistillLoss
    loss_name: str
    sharded: bool
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    log: MetricsLog
    fingerprint: str | None
    discarded: str | None
    monitor: health.DivergenceMonitor | None

    def _trained(self, m: nn.Module) -> nn.Module:
        raise NotImplementedError

    def _check_weights(self, step: int) -> None:
        named = [(spec.name, self._trained(spec.module)) for spec in self.students]
        gather = (lambda bad: ddp.gather_objects(bad, self.dist)) if self.sharded else None
        health.check_weights(named, step, self.config.lr, gather)

    def _state(self, step: int, epoch: int, position: int) -> dict[str, Any]:
        return {
            "version": 1,
            "step": step,
            "epoch": epoch,
            "position": position,
            "world_size": self.dist.world_size,
            "students": [fsdp.full_state_dict(self._trained(m)) if self.sharded else m.state_dict()
                         for m in self.modules],
            "loss": self.loss.state_dict(),
            "optimizer": fsdp.full_optimizer_state(self.optimizer) if self.sharded else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "fingerprint": self.fingerprint,
            "first_loss": self.monitor.first if self.monitor is not None else None,
        }  # fmt: skip

    def save(self, step: int, epoch: int, position: int) -> Path | None:
        self._check_weights(step)  # never checkpoint a NaN
        rngs = ddp.gather_objects(ckpt.rng_state(), self.dist)
        path = None
        # under FSDP gathering the full state is collective: every rank takes part, rank 0 writes
        state = self._state(step, epoch, position) if self.sharded else None
        if self.dist.is_main and self.config.checkpoint_dir is not None:
            payload = (state or self._state(step, epoch, position)) | {"rng": rngs}
            path = ckpt.save_checkpoint(self.config.checkpoint_dir, step, payload, self.config.keep_checkpoints)
        ddp.barrier(self.dist)
        return path

    def _restore(self, state: dict[str, Any], wrapped: dict[int, nn.Module]) -> None:
        for m, sd in zip(self.modules, state["students"]):
            if self.sharded and id(m) in wrapped:
                fsdp.load_full_state(wrapped[id(m)], sd)
            else:
                m.load_state_dict(sd)
        self.loss.load_state_dict(state["loss"])
        optimizer = state["optimizer"]
        self.optimizer.load_state_dict(fsdp.shard_optimizer_state(optimizer, self.optimizer) if self.sharded else optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def _fingerprint(self, data: DataSource, probe: Any) -> str:
        c = self.config
        if c.shard == "batches" and self.dist.enabled:  # each rank's probe differs: use the unsharded first
            probe = next(iter(epoch_batches(data, c.seed, 0)))
        first = as_batch(probe)
        settings = {k: v for k, v in dataclasses.asdict(c).items() if k not in NOT_FINGERPRINTED}
        tensors = [x for x in (*first.args, *first.kwargs.values(), first.target) if isinstance(x, torch.Tensor)]
        return ckpt.fingerprint(
            [ckpt.FORMAT, settings, self.dist.world_size, self.loss_name, *self.modules, self.loss,
             *([self.teacher] if self.teacher is not None else []), *tensors]
        )  # fmt: skip

    def _resume_state(self, data: DataSource, probe: Any) -> dict[str, Any] | None:
        """The checkpoint to continue from, if any matches this run; clears the ones that do not."""
        c = self.config
        if c.checkpoint_dir is None:
            return None
        self.fingerprint = self._fingerprint(data, probe)
        last = ckpt.latest_checkpoint(c.checkpoint_dir) if c.resume else None  # refuses pickles
        state = ckpt.load_checkpoint(last) if last is not None else None
        if state is not None and state.get("fingerprint") != self.fingerprint:
            self.discarded = f"{last}: written by a run with other settings, weights or data; started afresh"
            state = None
        if state is None:
            ddp.barrier(self.dist)  # every rank has read before rank 0 deletes
            if self.dist.is_main:
                ckpt.remove_checkpoints(c.checkpoint_dir)
                self.log.truncate_after(0)
            ddp.barrier(self.dist)
        return state
