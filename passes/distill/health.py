"""Numeric health of a distillation run: every loss, gradient and weight finite, and no divergence.

NaN compares false with everything, so a run that goes non-finite keeps "training" and hands on
all-NaN weights unless something looks. The trainer looks, each step:

1. **Loss** — the step's total loss must be finite, checked before the optimizer steps, so the
   weights never see it. The error names the step, the student, the loss term, and the likely
   source: non-finite values in the batch, in the teacher's output, or in the student's weights.
2. **Gradients** — the total gradient norm must be finite before the optimizer steps (not under
   fp16 loss scaling, whose scaler skips such steps by design).
3. **Weights** — every parameter finite, at each log step, before each checkpoint and at the end
   (so no checkpoint and no student ever holds a NaN). A sharded (FSDP) student is checked shard
   by shard and the ranks' findings are gathered, so every rank takes the same decision.

**Divergence.** ``ℓ₀`` is the loss at step 1: the untrained student's, which no learning rate can
change. ``recent`` is the mean loss of the last ``W = clamp(total/10, 5, 50)`` steps. With
``f = divergence_factor`` (10) and ``ℓ̂₀ = max(ℓ₀, 1e-3)`` (a start near zero is not a scale):

* ``recent > 100 f · ℓ̂₀`` at any step ends the run at once (``lr=1e6`` reaches 1e13 in two steps:
  no point training on);
* ``recent > f · ℓ̂₀`` at the end fails the run: the student ended far worse than it began.

A transient spike that the schedule recovers from passes (measured on the test MLP: AdamW with
``lr=1`` peaks at 44× then ends at 0.8× its start; ``lr=10`` ends at 5–30×). Both errors say the
fix: a lower ``lr`` (the message suggests ``min(lr/100, 1e-3)``) or warm-up steps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch
from potstill.errors import NumericError
from potstill.inputs.data import Batch
from torch import nn
from torch.distributed.tensor import DTensor

#: below this a starting loss is "about zero", not a scale to multiply
LOSS_FLOOR = 1e-3


def first_nonfinite_weight(module: nn.Module) -> str | None:
    """Name of the first parameter or buffer holding a NaN or an infinity, else None."""
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        t = t.to_local() if isinstance(t, DTensor) else t  # this rank's shard: a DTensor's all() is local
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def nonfinite_inputs(batch: Batch) -> list[str]:
    """Which of the batch's tensors hold NaN or infinity (``args[0]``, ``input_ids``, ``target``)."""
    named: list[tuple[str, Any]] = [(f"args[{i}]", a) for i, a in enumerate(batch.args)]
    named += [*batch.kwargs.items(), ("target", batch.target)]
    return [
        k
        for k, v in named
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def check_weights(
    modules: Iterable[tuple[str, nn.Module]],
    step: int,
    lr: float,
    gather: Callable[[Any], list[Any]] | None = None,
) -> None:
    """NumericError naming the student and weight when any student holds a non-finite value.

    ``gather`` (each rank's value -> all ranks' values) joins sharded students' per-rank findings.
    """
    for student, module in modules:
        bad = first_nonfinite_weight(module)
        if gather is not None:
            bad = next((b for b in gather(bad) if b is not None), None)
        if bad is not None:
            raise NumericError(
                f"distillation: student '{student}': weight '{bad}' is NaN/inf after step {step}; the optimizer "
                f"stepped it out of range: lower lr (now {lr:g}) or keep grad_clip, and check the training data"
            )


def explain_nonfinite_loss(
    step: int,
    terms: dict[str, dict[str, float]],
    batch: Batch,
    teacher_out_bad: bool,
    students: Iterable[tuple[str, nn.Module]],
) -> str:
    """The message for a non-finite loss: where (student, term, step) and the likely source."""
    bad = [(s, t, v) for s, parts in terms.items() for t, v in parts.items() if not math.isfinite(v)]
    where = "; ".join(f"student '{s}', loss term '{t}' = {v}" for s, t, v in bad) or "the total loss"
    inputs = nonfinite_inputs(batch)
    if inputs:
        cause = (
            f"the batch has NaN/inf in {', '.join(inputs)}: clean the training data (--data / train_data())"
        )
    elif teacher_out_bad:
        cause = "the teacher's output is NaN/inf on this batch: check the teacher and the input range"
    else:
        weights = [(s, w) for s, m in students if (w := first_nonfinite_weight(m)) is not None]
        if weights:
            cause = f"student '{weights[0][0]}' weight '{weights[0][1]}' is already NaN/inf: lower lr"
        else:
            cause = "the loss overflowed: lower lr, use fp32 precision, or check the inputs' scale"
    return f"distillation: the loss is not finite at step {step} ({where}); {cause}"


class DivergenceMonitor:
    """Watches the per-step loss and raises NumericError on divergence (rule in the module doc)."""

    def __init__(self, total_steps: int, factor: float | None, start_step: int = 0) -> None:
        self.factor = factor
        self.window: deque[float] = deque(maxlen=max(1, min(50, max(5, total_steps // 10))))
        self.first: float | None = None
        self.first_step = start_step + 1
        self.last_step = start_step

    def start_from(self, first: float | None) -> None:
        """A resumed run continues with the original run's step-1 loss."""
        self.first = first

    def update(self, step: int, loss: float, lr: float) -> None:
        self.last_step = step
        if self.first is None:
            self.first, self.first_step = loss, step
        self.window.append(loss)
        full = len(self.window) == self.window.maxlen
        if self.factor is not None and full and self._recent() > 100 * self.factor * self._base():
            raise NumericError(self._message(lr, "stopped early: "))

    def finish(self, lr: float) -> None:
        if self.factor is not None and self.window and self._recent() > self.factor * self._base():
            raise NumericError(self._message(lr, ""))

    def _base(self) -> float:
        return max(self.first or 0.0, LOSS_FLOOR)

    def _recent(self) -> float:
        return sum(self.window) / len(self.window)

    def _message(self, lr: float, prefix: str) -> str:
        recent, n, factor = self._recent(), len(self.window), self.factor or 0.0
        return (
            f"distillation diverged: {prefix}the loss rose from {self.first:.3g} at step {self.first_step} to "
            f"{recent:.3g} (mean of steps {self.last_step - n + 1}-{self.last_step}), more than "
            f"{factor:g}x its start; lower the learning rate (lr={lr:g} now; try distill{{lr={min(lr / 100, 1e-3):g}}}) "
            "or add warmup_steps"
        )
