"""Run by ``torchrun --nproc_per_node 2`` in test_distributed.py (and imported for the 1-process run)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from potstill.passes.distill import DistillTrainer, TensorBatches, TrainConfig
from torch import nn


def build() -> tuple[nn.Module, nn.Module, TensorBatches]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, 6, generator=g)
    y = torch.randint(0, 4, (96,), generator=g)
    return teacher, student, TensorBatches(x, y, batch_size=25, seed=3)


def train(checkpoint_dir: Path | None = None, rows: list[int] | None = None) -> nn.Module:
    torch.set_num_threads(1)
    teacher, student, data = build()
    if rows is not None:
        student.register_forward_pre_hook(lambda _m, args: rows.append(int(args[0].shape[0])))
    cfg = TrainConfig(epochs=3, lr=1e-2, progress=False, checkpoint_dir=checkpoint_dir, warmup_steps=2)
    DistillTrainer(student, teacher, "kd+hidden", cfg, temperature=2.0, alpha=0.7,
                   student_modules=("1",), teacher_modules=("1",)).fit(data)
    return student


if __name__ == "__main__":
    import torch.distributed as dist

    out = Path(sys.argv[1])
    rows: list[int] = []
    student = train(out / "ck", rows)
    (out / f"rows-{dist.get_rank()}.txt").write_text(" ".join(map(str, rows)))
    if dist.get_rank() == 0:
        torch.save({"world": dist.get_world_size(), "state": student.state_dict()}, out / "ddp.pt")
    dist.destroy_process_group()
