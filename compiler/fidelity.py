"""Fidelity: how closely a student still computes what its teacher did, on held-out inputs.

A minimal version of the interface the ``fidelity`` branch fills out (richer tasks there). The
teacher is the reference; no labels are needed. Over the held-out batches, with ``t`` the
teacher's primary output and ``s`` the student's:

* ``classification`` (logits ``[B, C]``): the score is top-1 agreement
  ``mean[argmax t = argmax s]``; ``kl`` is ``mean_n sum_c p_t (log p_t - log p_s)``, ``p = softmax``
  (agreement and KL as fidelity to the teacher: Stanton et al., NeurIPS 2021);
* ``output`` (anything else): ``rel_error = ||s - t||_2 / ||t||_2`` over all outputs and the
  score is ``max(0, 1 - rel_error)``.

A non-finite output makes the score NaN; NaN is never turned into a number.
``split_heldout`` sets aside a deterministic, evenly spread part of the calibration batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import as_batch, primary_output

TASKS = ("classification", "embedding", "causal_lm", "output")


@dataclass
class Fidelity:
    """Fidelity of a student to its teacher on ``n`` held-out samples."""

    task: str
    #: the task's primary measure, higher is better, 1.0 = identical to the teacher; NaN = failed
    score: float
    measures: dict[str, float] = field(default_factory=dict)
    n: int = 0


def infer_task(teacher: nn.Module, hf: dict[str, Any] | None, example_output: Any) -> str:
    """``classification`` for ``[B, C]`` logits (or an HF classification task), else ``output``."""
    task = str((hf or {}).get("task") or "")
    if "classification" in task:
        return "classification"
    out = primary_output(example_output)
    return "classification" if out.dim() == 2 and out.shape[-1] > 1 else "output"


def split_heldout(batches: list[Any], fraction: float = 0.25) -> tuple[list[Any], list[Any]]:
    """``(calib, heldout)``: every k-th batch (k = round(1/fraction)) is held out; disjoint and
    deterministic. Fewer than two batches cannot be split: all are calibration, none held out.

    >>> split_heldout(list(range(8)))
    ([0, 1, 2, 4, 5, 6], [3, 7])
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if len(batches) < 2:
        return list(batches), []
    k = max(2, round(1 / fraction))
    held = [b for i, b in enumerate(batches) if i % k == k - 1] or [batches[-1]]
    ids = {id(b) for b in held}
    return [b for b in batches if id(b) not in ids], held


def measure_fidelity(teacher: nn.Module, student: nn.Module, batches: Iterable[Any], task: str | None = None) -> Fidelity:
    """Compare ``student`` with ``teacher`` on ``batches``; see the module docstring."""
    ts, ss = [], []
    with torch.no_grad():
        for raw in batches:
            batch = as_batch(raw)
            ts.append(primary_output(batch.run(teacher)).detach().float().cpu())
            ss.append(primary_output(batch.run(student)).detach().float().cpu())
    if not ts:
        return Fidelity(task or "output", float("nan"), {"batches": 0.0}, 0)
    if task is None:
        task = "classification" if all(x.dim() == 2 and x.shape[-1] > 1 for x in ts) else "output"
    t, s = torch.cat([_rows(x) for x in ts]), torch.cat([_rows(x) for x in ss])
    n = int(t.shape[0])
    finite = bool(torch.isfinite(t).all() and torch.isfinite(s).all())
    if task == "classification":
        agreement = float((t.argmax(-1) == s.argmax(-1)).float().mean())
        kl = float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean"))
        measures = {"top1_agreement": agreement, "kl": kl}
        score = agreement
    else:
        task = "output"
        rel = float(torch.linalg.vector_norm(s - t) / torch.linalg.vector_norm(t).clamp_min(1e-12))
        measures = {"rel_error": rel}
        score = max(0.0, 1.0 - rel) if math.isfinite(rel) else float("nan")
    if not finite:
        score = float("nan")
        measures["nonfinite"] = 1.0
    return Fidelity(task, score, measures, n)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` as ``[B, features]`` (a scalar output is one row of one feature)."""
    return x.reshape(x.shape[0], -1) if x.dim() > 0 else x.reshape(1, 1)
