"""The teacher, frozen for one training run and put back as it came.

A teacher shared by several students (or by the compile's later passes) must leave each run with
the ``requires_grad`` flags, train/eval flags and device it had: ``FrozenTeacher.freeze`` records
them and sets eval mode without gradients (on the training device, unless its outputs are cached
and it never runs there); ``restore`` puts each flag back (``m.training = flag``, not ``m.train()``,
which would also reset the children).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class FrozenTeacher:
    def __init__(self, teacher: nn.Module | None) -> None:
        self.teacher = teacher
        self._saved: tuple[list[tuple[nn.Parameter, bool]], list[tuple[nn.Module, bool]], Any] | None = None

    def freeze(self, device: torch.device, move: bool = True) -> None:
        t = self.teacher
        if t is None:
            return
        first = next(iter(t.parameters()), None)
        self._saved = (
            [(p, p.requires_grad) for p in t.parameters()],
            [(m, m.training) for m in t.modules()],
            first.device if first is not None else None,
        )
        if move:
            t.to(device)
        t.eval().requires_grad_(False)

    def restore(self, device: torch.device) -> None:
        if self.teacher is None or self._saved is None:
            return
        params, modules, home = self._saved
        for p, flag in params:
            p.requires_grad_(flag)
        for m, training in modules:
            m.training = training
        if home is not None and home != device:
            self.teacher.to(home)
        self._saved = None


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; each module's own flag put back after (a student that
    trains without dropout keeps it off)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
