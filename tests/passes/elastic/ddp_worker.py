"""Run by ``torchrun --nproc_per_node 2`` in test_distributed.py (and imported for the 1-process run):
train a small MLP supernet with the sandwich rule; rank 0 saves the weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from potstill.passes.distill import TensorBatches, TrainConfig
from potstill.passes.elastic import make_supernet
from potstill.passes.elastic.train import train_supernet
from torch import nn


def build() -> tuple[nn.Module, nn.Module, TensorBatches]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, 6, generator=g)
    y = torch.randint(0, 4, (96,), generator=g)
    return teacher, student, TensorBatches(x, y, batch_size=24, seed=3)


def train(checkpoint_dir: Path | None = None, max_steps: int | None = None, resume: bool = False,
          rows: list[int] | None = None) -> nn.Module:
    """Train the supernet; ``rows`` collects the batch size of every forward pass of the student."""
    torch.set_num_threads(1)
    teacher, student, data = build()
    net = make_supernet(student, (torch.zeros(2, 6),))
    if rows is not None:
        student.register_forward_pre_hook(lambda _m, args: rows.append(int(args[0].shape[0])))
    cfg = TrainConfig(epochs=3, max_steps=max_steps, lr=1e-2, progress=False, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=2 if checkpoint_dir else 0, resume=resume)
    train_supernet(net, teacher, data, cfg, random_subnets=1, temperature=2.0)
    return student


if __name__ == "__main__":
    import torch.distributed as dist

    out = Path(sys.argv[1])
    rows: list[int] = []
    student = train(out / "ck", rows=rows)
    torch.save({"world": dist.get_world_size(), "state": student.state_dict(), "rows": sum(rows)},
               out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
