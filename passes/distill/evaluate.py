"""Evaluation hooks and the metrics log.

* accuracy: ``mean[argmax z_s = y]`` over labelled positions (``y = −100`` ignored);
* fidelity to the teacher: ``cosine`` — mean cosine similarity of the primary outputs (for
  [B, S, D] states, of their mean-pooled embeddings), and ``agreement`` — the fraction of
  positions where ``argmax z_s = argmax z_t`` (logits only).

An evaluator is ``fn(student, teacher, data) -> dict[str, float]``. ``MetricsLog`` appends one
JSON object per line (flushed and fsynced line by line); ``truncate_after(step)`` drops lines a
resumed run will write again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from potstill.inputs.data import Batch, iter_batches, primary_output
from potstill.outputs.atomic import atomic_write_text
from torch import nn

from .frozen import evaluating
from .losses import mean_pool

Evaluator = Callable[[nn.Module, "nn.Module | None", Any], dict[str, float]]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _is_logits(z: torch.Tensor, batch: Batch) -> bool:
    am = batch.kwargs.get("attention_mask")
    return not (z.dim() == 3 and isinstance(am, torch.Tensor) and z.shape[-1] > 64 and batch.target is None)


@torch.no_grad()
def evaluate(
    student: nn.Module, teacher: nn.Module | None, data: Any, limit: int | None = None
) -> dict[str, float]:
    """Accuracy (when batches carry labels) and fidelity to the teacher (when one is given)."""
    with evaluating(student):
        return _evaluate(student, teacher, data, limit)


def _evaluate(student: nn.Module, teacher: nn.Module | None, data: Any, limit: int | None) -> dict[str, float]:
    dev = _device(student)
    correct = labelled = agree = positions = 0
    cos_sum, n_cos = 0.0, 0
    for batch in iter_batches(data, limit):
        batch = batch.to(dev)
        z_s = primary_output(batch.run(student)).float()
        if batch.target is not None and z_s.shape[:-1] == batch.target.shape:
            valid = batch.target != -100
            correct += int(((z_s.argmax(-1) == batch.target) & valid).sum())
            labelled += int(valid.sum())
        if teacher is None:
            continue
        # the teacher runs where it is: beside the student, or elsewhere when its outputs were cached
        z_t = primary_output(batch.to(_device(teacher)).run(teacher)).float().to(dev)
        am = batch.kwargs.get("attention_mask")
        am = am if isinstance(am, torch.Tensor) else None
        e_s, e_t = (mean_pool(z_s, am), mean_pool(z_t, am)) if z_s.dim() == 3 else (z_s, z_t)
        if e_s.shape == e_t.shape:
            cos = F.cosine_similarity(e_s.flatten(1), e_t.flatten(1), dim=-1)
            cos_sum += float(cos.sum())
            n_cos += cos.numel()
        if _is_logits(z_s, batch) and z_s.shape == z_t.shape:
            same = z_s.argmax(-1) == z_t.argmax(-1)
            if am is not None and am.shape == same.shape:
                same, count = same & am.bool(), int(am.sum())
            else:
                count = same.numel()
            agree += int(same.sum())
            positions += count
    out: dict[str, float] = {}
    if labelled:
        out["accuracy"] = correct / labelled
    if n_cos:
        out["cosine"] = cos_sum / n_cos
    if positions:
        out["agreement"] = agree / positions
    return out


class MetricsLog:
    """A JSON-lines log written by rank 0; each line is appended, flushed and fsynced."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        if self.path is None or not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return out

    def truncate_after(self, step: int) -> None:
        """Keep only records up to ``step`` (a resumed run writes the later ones again)."""
        if self.path is None or not self.path.exists():
            return
        kept = [r for r in self.records() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, default=float) + "\n" for r in kept))

