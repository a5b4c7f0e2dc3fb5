"""Scale-out under ``torchrun``: every rank trains, rank 0 alone analyses, lowers and writes.

``Ranks.detect()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``) and joins the process
group (gloo on CPU, NCCL with CUDA). ``DistributedInstrument`` runs on every rank only the passes
marked ``collective`` (distillation); before one, rank 0 broadcasts the working student (the
architecture rank 0's pruning chose, and its weights) so every rank trains the same model in DDP.
Passes that are not collective are skipped on the other ranks, which then wait at a barrier while
rank 0 writes OUT.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from potstill.pipeline import Pass, PassInstrument

if TYPE_CHECKING:
    from potstill.state import CompileState


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def detect(cls) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_student(self, state: CompileState) -> None:
        """Rank 0's working student (module and name) replaces every other rank's."""
        import torch.distributed as dist

        student = state.working()
        box = [student.module if self.is_writer else None]
        dist.broadcast_object_list(box, src=0)
        if not self.is_writer and box[0] is not None:
            student.module = box[0]


@dataclass
class DistributedInstrument(PassInstrument):
    """On a multi-rank run: non-collective passes run on rank 0 only; collective ones everywhere,
    after the working student is broadcast from rank 0."""

    ranks: Ranks

    def should_run(self, p: Pass, state: CompileState) -> bool:
        return not self.ranks.distributed or self.ranks.is_writer or p.collective

    def before_pass(self, p: Pass, state: CompileState) -> None:
        if self.ranks.distributed and p.collective:
            self.ranks.broadcast_student(state)
