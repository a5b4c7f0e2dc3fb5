"""Trial surgery: pin the attention heads whose removal the module's own forward cannot follow.

The coupled-channel analysis sees the captured graph, where every reshape's sizes are constants.
``x.view(b, t, self.num_heads, -1)`` and ``x.view(b, t, 4, -1)`` look alike there, and so do a
reshape to an attribute that surgery updates (``all_head_size``, ``embed_dim``) and one to a width
read from the *input* (SigLIP's ``attn_output.reshape(b, t, hidden_states.shape[-1])``), or a
head count that also splits the residual stream (WavLM's gated relative-position bias,
``hidden_states.view(b, t, num_heads, -1)``, and ``F.multi_head_attention_forward``, which takes
``head_dim = embed_dim // num_heads`` of the *input* width). Only running the narrowed module tells
them apart.

``pin_unfollowable_heads`` removes one head from every prunable ``heads`` / ``kv_heads`` group at
once (``prune_width`` on a copy-on-write copy) and runs the copy on the example inputs: one
forward when it works. When it fails, it tries the groups of each attention class alone (the
groups of one class run the same code) and pins the groups of every class whose forward fails,
with the error, so that allocation never picks them and ``potstill inspect`` says why.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from potstill.ir.types import Analysis, CoupledGroup

HEAD_KINDS = ("heads", "kv_heads")


def _attention_class(model: nn.Module, group: CoupledGroup) -> str:
    """The class of the module that owns the group's producing projection (its parent)."""
    owner = next((m.module for m in group.members if m.role == "out"), group.members[0].module)
    parent = owner.rsplit(".", 1)[0] if "." in owner else ""
    try:
        return type(model.get_submodule(parent)).__name__
    except AttributeError:
        return parent


def _forward_error(model: nn.Module, analysis: Analysis, groups: Iterable[CoupledGroup],
                   example_inputs: tuple[Any, ...], example_kwargs: dict[str, Any]) -> str | None:
    """The first line of the error the narrowed copy raises on the example inputs, else ``None``."""
    from potstill.ir.surgery import prune_width

    keep = {g.id: list(range(1, g.n_units)) for g in groups}
    try:
        student = prune_width(model, analysis, keep).eval()
        with torch.no_grad():
            student(*example_inputs, **example_kwargs)
    except Exception as e:  # any failure of the narrowed forward is the finding
        text = f"{type(e).__name__}: {e}".strip().splitlines()
        return text[0][:200] if text else type(e).__name__
    return None


def _owner(group: CoupledGroup) -> str:
    owner = next((m.module for m in group.members if m.role == "out"), group.members[0].module)
    return owner.rsplit(".", 1)[0] if "." in owner else ""


def _signature(group: CoupledGroup) -> tuple[tuple[str, int], ...]:
    """The group's members with layer indices left out: the groups of one signature in modules of
    one class run the same code at each layer."""
    return tuple(sorted({(re.sub(r"\.\d+\.", ".#.", m.param), m.dim) for m in group.members}))


def _candidates(analysis: Analysis) -> list[CoupledGroup]:
    """Head groups, groups as wide as a tensor a factory op made (``zeros(b, inner, state)``), and the
    other groups those modules produce (a width the module splits by an attribute, Mamba's
    ``time_step_rank``)."""
    free = [g for g in analysis.groups if g.pinned is None and g.n_units > 1]
    owners = {_owner(g) for g in free if g.sized_by}
    return [g for g in free if g.kind in HEAD_KINDS or g.sized_by or (g.kind != "hidden" and _owner(g) in owners)]


def pin_unfollowable_heads(model: nn.Module, analysis: Analysis, example_inputs: tuple[Any, ...],
                           example_kwargs: dict[str, Any] | None = None) -> list[CoupledGroup]:
    """Pin (in place) the head groups, and the groups sized by a factory op, whose one-unit removal
    breaks the forward; returns them."""
    kwargs = example_kwargs or {}
    candidates = _candidates(analysis)
    if not candidates or _forward_error(model, analysis, candidates, example_inputs, kwargs) is None:
        return []
    by_class: dict[tuple[str, tuple[tuple[str, int], ...]], list[CoupledGroup]] = {}
    for g in candidates:
        sig = () if g.kind in HEAD_KINDS else _signature(g)
        by_class.setdefault((_attention_class(model, g), sig), []).append(g)
    pinned: list[CoupledGroup] = []
    for (cls, _), groups in by_class.items():
        err = _forward_error(model, analysis, groups, example_inputs, kwargs)
        if err is None:
            continue
        for g in groups:
            if g.kind in HEAD_KINDS:
                g.pinned = (f"{cls}'s forward fails once a head is removed ({err}): it sizes a reshape by "
                            "the unpruned width")
            else:
                g.pinned = (f"{cls}'s forward fails once a unit is removed ({err}): it sizes a tensor or a "
                            "split by the unpruned width")
        pinned += groups
    return pinned
