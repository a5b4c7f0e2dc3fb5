"""Guards on what goes into a compile: calibration batches hold finite numbers only, and, after
every pass, the reference teacher was not modified in place.

A NaN or an infinity in one calibration batch turns every importance score it touches into NaN, and
the student that comes out of it into noise, far from the cause; so the batches are checked once,
when they are read, and the first bad one is named (batch index and input).


Every student starts from the one reference teacher, so a pass that writes into the teacher's
tensors (an in-place ``mul_`` on a shared weight, BatchNorm statistics updated in train mode)
would silently change every later student and the fidelity baseline. Each tensor carries a
version counter that every in-place operation increments (``Tensor._version``, the counter
autograd uses to detect modified saved tensors); comparing the counters before and after a pass
costs one integer per tensor, so the check can run always. Writes inside a native kernel are not
all counted — BatchNorm's running statistics in train mode are not, but its
``num_batches_tracked`` counter, bumped by the same forward, is. It is also what makes students that
*share* the teacher's unpruned tensors (instead of deep copies) safe: a pass that writes into a
shared tensor is caught at once, naming the pass and the tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from potstill.errors import InputError
from potstill.pipeline import Pass, PassError, PassInstrument, PassResult
from torch import nn


def check_finite_batches(batches: Sequence[Any], source: str) -> None:
    """``InputError`` naming the first batch of ``source`` (e.g. ``--calib data.py:calib``) whose
    floating-point inputs or target hold a NaN or an infinity, and which ones."""
    from potstill.inputs.data import as_batch
    from potstill.passes.distill.health import nonfinite_inputs

    for i, raw in enumerate(batches):
        bad = nonfinite_inputs(as_batch(raw))
        if bad:
            raise InputError(
                f"calibration data ({source}): batch {i} of {len(batches)} holds NaN or infinite values in "
                f"{', '.join(bad)}; clean or drop those samples (potstill never calibrates on non-finite numbers)"
            )


def tensor_versions(module: nn.Module) -> dict[str, int]:
    """Name -> version counter of every parameter and buffer."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {name: t._version for name, t in named if isinstance(t, torch.Tensor)}


class TeacherGuard(PassInstrument):
    """Raises ``PassError`` after a pass that modified the state's teacher in place."""

    def __init__(self) -> None:
        self._before: dict[str, int] = {}

    def before_pass(self, p: Pass, state: Any) -> None:
        self._before = tensor_versions(state.teacher)

    def after_pass(self, p: Pass, state: Any, result: PassResult) -> None:
        after = tensor_versions(result.state.teacher)
        changed = sorted(k for k, v in after.items() if self._before.get(k, v) != v)
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise PassError(
                f"pass '{p.spec()}' modified the reference teacher in place ({', '.join(changed[:3])}{more}); "
                "passes must change students only (copy a tensor before writing into it)"
            )
