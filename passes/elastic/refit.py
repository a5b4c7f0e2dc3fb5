"""Least-squares refit of each extracted finalist, kept only where it raises held-out fidelity.

A subnet of the supernet reads fewer channels in the layers that consume an elastic width (an
inverted-residual block's projection, a transformer's FFN down projection and attention output),
and may lose blocks, run trained weights or re-estimated BatchNorm statistics: each changes what
such a layer sees. The retraining-free prune path repairs exactly these layers by least squares
(``potstill.passes.prune.reconstruct``; He et al. 2017, Kwon et al. 2022); the same closed form is
applied here to the extracted finalist, with the *nested teacher* (the supernet's weights before
training, stored statistics, every width and block) as the source: each consumer, in forward order,
is refitted so that, on the calibration batches, it reproduces the teacher's output of that layer
from the student's own input, which also absorbs the drift removed blocks leave upstream. A norm
that reads a refitted layer's output gets the teacher's statistics back (the layer now produces the
teacher's output there); every other norm keeps the statistics the finalist was scored with.

A finalist keeps the refit only when its score on the held-out batches rises (ties keep it as it
was), the rule every other repair follows (``keep``, ``bn.recalibrate``, the distillation check);
the record has both scores (``Finalist.refit``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from potstill.inputs.data import Batch
from potstill.passes.prune.reconstruct import (
    Captures,
    consumers,
    following_batchnorms,
    forward_order,
    kept_rows,
    refit_in_order,
    refit_layer,
)
from torch import nn

from .extract import extract
from .score import Scorer, Source, better
from .space import SubnetConfig
from .supernet import Supernet

#: the ridge of every refit, relative to the Gram's diagonal (the prune path's default)
RIDGE = 1e-3


def kept_blocks(net: Supernet, config: SubnetConfig) -> dict[str, list[int]]:
    """For each container that the subnet ``config`` drops blocks of, the supernet's index of each
    block it keeps, in order (the extracted student's block ``j`` is the supernet's ``kept[j]``)."""
    blocks = {b.name: b for b in net.analysis.blocks}
    kept: dict[str, list[int]] = {}
    for name in net.space.removed_blocks(config):
        b = blocks[name]
        if b.container not in kept:
            kept[b.container] = list(range(len(list(net.model.get_submodule(b.container).children()))))
        kept[b.container].remove(b.index)
    return kept


def block_renamer(kept: dict[str, list[int]]) -> tuple[Callable[[str], str], Callable[[str], str | None]]:
    """Name maps between a subnet extracted from a supernet (its dropped blocks removed and the rest
    renumbered; ``kept``: ``kept_blocks``) and the supernet: student name -> supernet name, and
    supernet name -> student name (None: inside a dropped block)."""

    def split(name: str) -> tuple[str, int, str] | None:
        """``(container, index, rest)`` for a name inside a block of a container that lost blocks."""
        for container in kept:
            prefix = f"{container}." if container else ""
            head, _, rest = name[len(prefix):].partition(".")
            if name.startswith(prefix) and head.isdigit() and rest:
                return container, int(head), rest
        return None

    def joined(container: str, index: int, rest: str) -> str:
        return f"{container}.{index}.{rest}" if container else f"{index}.{rest}"

    def to_source(name: str) -> str:
        hit = split(name)
        return name if hit is None else joined(hit[0], kept[hit[0]][hit[1]], hit[2])

    def to_student(name: str) -> str | None:
        hit = split(name)
        if hit is None:
            return name
        container, index, rest = hit
        return joined(container, kept[container].index(index), rest) if index in kept[container] else None

    return to_source, to_student


def nested_teacher(scorer: Scorer) -> nn.Module:
    """The supernet's largest subnet with the weights before training (where kept) and the stored
    BatchNorm statistics: the teacher, its channels in nested order."""
    net, largest = scorer.net, scorer.net.space.largest()
    offered = scorer.candidates()
    source = next((s for s in (Source("untrained", "stored"), Source("trained", "stored")) if s in offered), offered[0])
    with scorer.prepared(largest, source, scorer.calib):
        return extract(net, largest).module


def refit_subnet(net: Supernet, reference: nn.Module, module: nn.Module, config: SubnetConfig,
                 calib: Sequence[Batch]) -> int:  # fmt: skip
    """Refit, in place and in forward order, ``module`` (the subnet ``config`` extracted from ``net``)'s
    consumers of the elastic widths toward ``reference`` (the nested teacher) on ``calib``; returns
    how many layers were refitted."""
    kept = kept_blocks(net, config)
    to_source, to_student = block_renamer(kept)
    targets = consumers(reference, net.analysis, [d.group for d in net.space.width_dims], spatial=True)
    names = [n for n in (to_student(t) for t in targets) if n is not None]
    if not names or not calib:
        return 0
    module.eval()
    names = forward_order(module, names, calib[0])
    keep = net.space.keep(config)
    rows = {n: kept_rows(net.analysis, to_source(n), keep) for n in names}
    norms = following_batchnorms(module, names, calib[0])
    called = {id(m): n for n, m in module.named_modules()}
    with torch.no_grad():
        for name, bn in norms.items():
            # the layer is fitted to the teacher's output before this norm, so the norm normalises it
            # with the teacher's statistics (a subnet scored with re-estimated ones has other statistics here)
            source = reference.get_submodule(to_source(called[id(bn)]))
            index = torch.tensor(rows[name]) if rows[name] is not None else slice(None)
            for stat in ("running_mean", "running_var"):
                getattr(bn, stat).copy_(getattr(source, stat)[index])

    def refit(name: str, captured: Captures | None = None) -> None:
        sink = norms.get(name) if getattr(module.get_submodule(name), "bias", None) is None else None
        refit_layer(reference, module, name, calib, RIDGE, sink, rows[name], captured=captured, rename=to_source)

    # a layer stack one block at a time (a whole-model forward per layer costs O(layers²) block forwards)
    refit_in_order(reference, module, names, calib, refit, kept)
    return len(names)


def refit_finalists(finalists: Sequence[Any], scorer: Scorer, calib: Sequence[Batch]) -> None:
    """Refit, on ``calib``, the consumers of the elastic widths in each finalist (``search.Finalist``)
    and keep the refit where the held-out score rises; records ``Finalist.refit`` in place.

    Where the finalist ships the trained weights and the supernet kept those before training, both
    are refitted and the better refit competes: on EfficientNet-Lite0 (20 photos) the subnets near
    a 1.3x budget drop blocks, and refitted from the weights before training they agreed with the
    teacher on 0.69 of 96 held-out crops, against 0.32 as trained and shipped."""
    if not finalists or not calib or not scorer.net.space.width_dims:
        return
    reference = nested_teacher(scorer)
    untrained = next((s for s in reversed(scorer.candidates()) if s.weights == "untrained"), None)
    for f in finalists:
        shipped = (f.weights_check or {}).get("kept", "trained")
        bases = [(shipped, copy.deepcopy(f.module))]
        if untrained is not None and shipped != "untrained":
            with scorer.prepared(f.config, untrained, calib):
                bases.append(("untrained", extract(scorer.net, f.config).module))
        tried = []
        for weights, student in bases:
            layers = refit_subnet(scorer.net, reference, student, f.config, calib)
            if layers:
                tried.append((float(scorer.score_module(student)), weights, student, layers))
        if not tried:
            continue
        after, weights, student, layers = tried[0]
        for t in tried[1:]:
            if better(t[0], after):
                after, weights, student, layers = t
        kept = better(after, f.accuracy)
        f.refit = {"before": f.accuracy, "after": after, "kept": kept, "layers": layers, "weights": weights,
                   "scores": {w: a for a, w, _, _ in tried}}
        if kept:
            f.module, f.accuracy, f.artifact = student, after, None  # the lowering pass builds the shipped engine
