"""Run by ``torchrun --nproc_per_node 2`` in test_fsdp.py (and imported for the 1-process run)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(3)])
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def build() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    torch.manual_seed(1)
    student = Net()
    x = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(2))  # 3 steps of 8 samples
    return teacher, student, x


def train(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor]) -> None:
    """Plain distillation steps: match the teacher's logits (MSE), SGD."""
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for x in batches:
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(student(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


if __name__ == "__main__":
    import torch.distributed as dist
    from potstill.passes.distill.fsdp import full_state_dict, shard_student

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    teacher, student, x = build()
    shard_student(student)
    local_rows = student.layers[0].weight.to_local().shape[0]  # type: ignore[union-attr]
    train(student, teacher, [b.chunk(world)[rank] for b in x])  # each rank: its half of every batch
    state = full_state_dict(student)
    if rank == 0:
        torch.save({"world": world, "local_rows": local_rows, "state": state}, Path(sys.argv[1]) / "fsdp.pt")
    dist.destroy_process_group()
