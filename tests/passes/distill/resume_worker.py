"""A slow, seeded distillation run that test_resume.py kills and resumes."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from potstill.passes.distill import DistillTrainer, TrainConfig
from torch import nn


def make_data(delay: float):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(128, 6, generator=g)

    def data(epoch: int) -> Iterator[torch.Tensor]:
        # order from the trainer's (seed, epoch) seeding; noise from the global RNG, as user code does
        order = torch.randperm(128)
        for i in range(0, 128, 8):
            time.sleep(delay)
            yield x[order[i:i + 8]] + 0.1 * torch.randn(8, 6)

    return data


def run(checkpoint_dir: Path | None, resume: bool, delay: float = 0.0) -> nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 4))
    cfg = TrainConfig(epochs=3, lr=5e-3, progress=False, checkpoint_dir=checkpoint_dir, checkpoint_every=5,
                      resume=resume, warmup_steps=3, optimizer="adamw", weight_decay=0.01,
                      log_path=None if checkpoint_dir is None else checkpoint_dir / "log.jsonl", log_every=1)
    result = DistillTrainer(student, teacher, "kd", cfg, temperature=2.0).fit(make_data(delay))
    student.resumed_from = result.resumed_from  # type: ignore[assignment]
    return student


if __name__ == "__main__":
    out = Path(sys.argv[1])
    student = run(out / "ck", resume=sys.argv[2] == "resume", delay=float(sys.argv[3]))
    torch.save(student.state_dict(), out / "final.pt")
    (out / "resumed_from.txt").write_text(str(student.resumed_from))
