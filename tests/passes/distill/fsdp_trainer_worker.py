"""Run by ``torchrun --nproc_per_node 2`` in test_fsdp.py (and imported for the 1-process run):
``DistillTrainer`` with ``parallel="fsdp"``, then a resumed copy of the same run."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from potstill.passes.distill import DistillTrainer, TensorBatches, TrainConfig
from torch import nn


class Net(nn.Module):
    """Blocks of uneven widths (5 rows split 3 + 2) and a non-persistent buffer no state dict carries."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 6), nn.Linear(6, 6)])
        self.head = nn.Linear(6, 4)
        self.register_buffer("gain", torch.tensor(0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x) / self.gain


def build() -> tuple[nn.Module, Net, TensorBatches]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    torch.manual_seed(1)
    student = Net()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, 6, generator=g)
    y = torch.randint(0, 4, (96,), generator=g)
    return teacher, student, TensorBatches(x, y, batch_size=25, seed=3)


def train(parallel: str = "auto", checkpoint_dir: Path | None = None, resume: bool = False) -> tuple[Net, int | None]:
    """kd + hidden (its learned projection is a plain parameter beside the sharded ones), SGD with momentum,
    gradients clipped hard enough that clipping acts every step."""
    torch.set_num_threads(1)
    teacher, student, data = build()
    cfg = TrainConfig(epochs=3, lr=0.5, optimizer="sgd", progress=False, warmup_steps=2, grad_clip=0.05, parallel=parallel,
                      checkpoint_dir=checkpoint_dir, checkpoint_every=3, keep_checkpoints=10, resume=resume)
    result = DistillTrainer(student, teacher, "kd+hidden", cfg, temperature=2.0, alpha=0.7,
                            student_modules=("layers.1",), teacher_modules=("0",)).fit(data)
    return student, result.resumed_from


if __name__ == "__main__":
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    out = Path(sys.argv[1])
    student, _ = train("fsdp", out / "ck")
    rank = dist.get_rank()
    plain = type(student) is Net and not any(isinstance(t, DTensor) for t in student.state_dict().values())
    x = torch.randn(3, 6)
    exported = torch.export.export(student, (x,)).module()(x)  # an ordinary module: torch.export takes it
    torch.testing.assert_close(exported, student(x))
    written = sorted(p.name for p in (out / "ck").iterdir() if p.name.startswith("step-"))
    dist.barrier()
    if rank == 0:  # forget the last two checkpoints: the resumed run continues from step 6
        for name in written[2:]:
            shutil.rmtree(out / "ck" / name)
    dist.barrier()
    resumed, resumed_from = train("fsdp", out / "ck", resume=True)
    torch.save({"world": dist.get_world_size(), "plain": plain, "written": written, "state": student.state_dict(),
                "resumed": resumed.state_dict(), "resumed_from": resumed_from}, out / f"fsdp-trainer-{rank}.pt")
    dist.destroy_process_group()
