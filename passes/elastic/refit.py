"""Least-squares refit of each extracted finalist, kept only where it raises held-out fidelity.

A subnet of the supernet reads fewer channels in the layers that consume an elastic width (an
inverted-residual block's projection, a transformer's FFN down projection and attention output),
and may lose blocks, run trained weights or re-estimated BatchNorm statistics: each changes what
such a layer sees. The retraining-free prune path repairs exactly these layers by least squares
(``potstill.passes.prune.reconstruct``; He et al. 2017, Kwon et al. 2022); the same closed form is
applied here to the extracted finalist, with the *nested teacher* (the supernet's weights before
training, stored statistics, every width and block) as the source: each consumer, in forward order,
is refitted so that, on the calibration batches, it reproduces the teacher's output of that layer
from the student's own input, which also absorbs the drift removed blocks leave upstream.

A finalist keeps the refit only when its score on the held-out batches rises (ties keep it as it
was), the rule every other repair follows (``keep``, ``bn.recalibrate``, the distillation check);
the record has both scores (``Finalist.refit``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from potstill.inputs.data import Batch
from potstill.passes.prune.reconstruct import (
    consumers,
    following_batchnorms,
    forward_order,
    kept_rows,
    refit_layer,
)

from .extract import extract
from .score import Scorer, Source, better
from .space import SubnetConfig
from .supernet import Supernet

#: the ridge of every refit, relative to the Gram's diagonal (the prune path's default)
RIDGE = 1e-3


def block_renamer(net: Supernet, config: SubnetConfig) -> tuple[Callable[[str], str], Callable[[str], str | None]]:
    """Name maps between the subnet ``config`` extracted from ``net`` (its dropped blocks removed and
    the rest renumbered) and the supernet: student name -> supernet name, and supernet name ->
    student name (None: inside a dropped block)."""
    blocks = {b.name: b for b in net.analysis.blocks}
    kept: dict[str, list[int]] = {}
    for name in net.space.removed_blocks(config):
        b = blocks[name]
        if b.container not in kept:
            kept[b.container] = list(range(len(list(net.model.get_submodule(b.container).children()))))
        kept[b.container].remove(b.index)

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


def refit_finalists(finalists: Sequence[Any], scorer: Scorer, calib: Sequence[Batch]) -> None:
    """Refit, on ``calib``, the consumers of the elastic widths in each finalist (``search.Finalist``)
    and keep the refit where the held-out score rises; records ``Finalist.refit`` in place."""
    net = scorer.net
    if not finalists or not calib or not net.space.width_dims:
        return
    largest = net.space.largest()
    offered = scorer.candidates()
    source = Source("untrained", "stored") if Source("untrained", "stored") in offered else \
        Source("trained", "stored") if Source("trained", "stored") in offered else offered[0]
    with scorer.prepared(largest, source, calib):
        reference = extract(net, largest).module  # the nested teacher
    targets = consumers(reference, net.analysis, [d.group for d in net.space.width_dims], spatial=True)
    for f in finalists:
        to_source, to_student = block_renamer(net, f.config)
        names = [n for n in (to_student(t) for t in targets) if n is not None]
        if not names:
            continue
        student = copy.deepcopy(f.module)
        student.eval()
        names = forward_order(student, names, calib[0])
        no_bias = [n for n in names if getattr(student.get_submodule(n), "bias", None) is None]
        sinks = following_batchnorms(student, no_bias, calib[0]) if no_bias else {}
        keep = net.space.keep(f.config)
        for name in names:
            refit_layer(reference, student, name, calib, RIDGE, sinks.get(name),
                        kept_rows(net.analysis, to_source(name), keep), rename=to_source)
        after = float(scorer.score_module(student))
        kept = better(after, f.accuracy)
        f.refit = {"before": f.accuracy, "after": after, "kept": kept, "layers": len(names)}
        if kept:
            f.module, f.accuracy, f.artifact = student, after, None  # the lowering pass builds the shipped engine
