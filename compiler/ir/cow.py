"""Copy-on-write module copies: students that share the teacher's tensors until a pass writes.

A student used to start as ``copy.deepcopy(teacher)``, and width or depth surgery deep-copied it
again before slicing: three copies of every weight at the peak, for tensors most of which are
sliced (new storage) a moment later. ``shared_copy`` copies the module structure (submodules,
configs, plain attributes) but gives each parameter and buffer a new tensor object over the *same*
storage (``Tensor.detach``: one storage, one version counter). Surgery swaps a sliced tensor for
a new object everywhere it is held (``TensorSlots.replace``), so the source keeps its own and the
slice has a counter of its own; nothing is copied that is not changed.

Writing into a shared tensor in place would write into the teacher. So:

* a pass that may write weights in place (``Pass.in_place``, the default) first calls
  :func:`unshare` on every student, which clones just the tensors still shared with the teacher;
* passes that only read weights or build new modules (importance, width and depth surgery,
  lowering, recording) declare ``in_place = False`` and keep the sharing;
* the ``TeacherGuard`` instrument checks the teacher's version counters after every pass, and a
  shared tensor shares its counter, so a write that slips through is caught, naming the pass.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import cast

import torch
from torch import nn


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every distinct parameter and buffer object (a tied tensor once)."""
    yield from module.parameters()
    yield from module.buffers()


def shared_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers share storage with it.

    Tied tensors stay tied (one new object per original object); ``requires_grad`` is kept.

    >>> m = nn.Linear(3, 2)
    >>> c = shared_copy(m)
    >>> c.weight is m.weight, c.weight.data_ptr() == m.weight.data_ptr()
    (False, True)
    """
    memo: dict[int, object] = {}
    for t in _tensors(module):
        if id(t) in memo:
            continue
        if isinstance(t, nn.Parameter):
            memo[id(t)] = nn.Parameter(t.detach(), requires_grad=t.requires_grad)
        else:
            memo[id(t)] = t.detach()
    return copy.deepcopy(module, memo)


class TensorSlots:
    """Where each parameter and buffer object of a module is held (owner module, attribute name),
    so a tensor can be swapped for a new object everywhere at once (tied tensors stay tied).

    Swapping objects, not ``t.data``, matters: a shared copy's tensor shares the teacher's version
    counter, and ``t.data = ...`` keeps that counter, so later in-place training of the new data
    would look like a write into the teacher."""

    def __init__(self, module: nn.Module) -> None:
        self._slots: dict[int, tuple[torch.Tensor, list[tuple[nn.Module, str, bool]]]] = {}
        for owner in module.modules():
            for is_param, table in ((True, owner._parameters), (False, owner._buffers)):
                for name, t in table.items():
                    if t is not None:
                        self._slots.setdefault(id(t), (t, []))[1].append((owner, name, is_param))

    def tensors(self) -> list[torch.Tensor]:
        """Every distinct parameter and buffer object."""
        return [t for t, _ in self._slots.values()]

    def replace(self, old: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """Hold ``data`` wherever ``old`` was held (a new ``Parameter`` if ``old`` was one)."""
        _, slots = self._slots.pop(id(old), (old, []))
        new: torch.Tensor = nn.Parameter(data, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else data
        for owner, name, is_param in slots:
            if is_param:
                owner._parameters[name] = cast(nn.Parameter, new)
            else:
                owner._buffers[name] = new
        self._slots[id(new)] = (new, slots)
        return new


def _storages(module: nn.Module) -> set[int]:
    return {p for t in _tensors(module) if (p := t.untyped_storage().data_ptr()) != 0}


def shares_storage(module: nn.Module, reference: nn.Module) -> bool:
    """Whether any tensor of ``module`` lives in the storage of one of ``reference``'s."""
    theirs = _storages(reference)
    return any(t.untyped_storage().data_ptr() in theirs for t in _tensors(module))


def unshare(module: nn.Module, reference: nn.Module) -> int:
    """Give ``module`` its own copy (a new object, with its own version counter) of every tensor
    it shares with ``reference``; tied tensors stay tied. Returns the bytes copied.

    >>> m = nn.Linear(3, 2)
    >>> c = shared_copy(m)
    >>> unshare(c, m) > 0, shares_storage(c, m)
    (True, False)
    """
    theirs = _storages(reference)
    if not theirs:
        return 0
    slots = TensorSlots(module)
    copied = 0
    for t in slots.tensors():
        if t.untyped_storage().data_ptr() in theirs:
            slots.replace(t, t.detach().clone())
            copied += t.numel() * t.element_size()
    return copied


__all__ = ["TensorSlots", "shared_copy", "shares_storage", "unshare"]
