"""Checkpoints that let an interrupted distillation resume bit-for-bit.

A checkpoint holds the students' and the loss's weights, the optimizer, scheduler and grad-scaler
states, the RNG states of torch (CPU and CUDA), NumPy and Python — one set per rank — and the
position in the data: ``step``, ``epoch`` and ``position`` (batches consumed in that epoch).
Because every epoch's data order is a function of ``(seed, epoch)``, resuming replays the epoch's
iterator up to ``position``, then restores the RNG states, and the run continues exactly as if it
had never stopped. Files are written atomically (``step-00000042.pt``), the newest ``keep`` kept.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from potstill.atomic import atomic_write_bytes

_NAME = re.compile(r"step-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def list_checkpoints(directory: Path | None) -> list[Path]:
    if directory is None or not Path(directory).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Path | None) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep: int = 1) -> Path:
    """Write ``payload`` atomically as ``step-NNNNNNNN.pt``; drop all but the newest ``keep``."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = atomic_write_bytes(checkpoint_path(directory, step), buf.getvalue())
    for old in list_checkpoints(directory)[:-max(keep, 1)]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    # our own file: it carries optimizer state and RNG tuples, not only tensors
    return torch.load(path, map_location="cpu", weights_only=False)
