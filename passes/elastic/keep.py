"""Training, and BatchNorm re-estimation, are kept per subnet only where they raise held-out fidelity.

The sandwich rule trains every subnet on the same shared weights, so it can lower the fidelity of
some subnets while it raises that of others; the largest starts *as* the teacher (the supernet is
the nested teacher) and can only lose. For each finalist configuration ``c`` the search extracts
one student per source ``s`` the supernet offers (``score.Source``: the trained weights ``θ`` or
those before training ``θ₀``, each with BatchNorm statistics re-estimated for ``c`` or as stored),
scores each on the held-out batches

    A_s(c) = score(extract(s, c))

and ships the best one (ties go to the trained weights, then to re-estimated statistics). The
choice is per extracted subnet, because the subnets share weights: a training that helps the small
subnets and costs the large ones keeps both gains. ``potstill.passes.distill`` applies the same
rule to a plain student, and ``bn.recalibrate`` the same check to its statistics.

Measured on all-MiniLM-L6-v2 (sandwich training at lr 3e-5): the full-size subnet fell from a
held-out cosine of 1.0 to ~0.97 in FP32, so the trained weights were the worse ones there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .extract import extract
from .score import Scorer, Source, best_of


def settle_weights(finalists: Sequence[Any], scorer: Scorer, calib: Sequence[Any]) -> None:
    """Give each finalist (``search.Finalist``, its ``module`` extracted from the trained weights with
    statistics re-estimated on ``calib``) the best of the subnets its sources give, in place; records
    every score in ``weights_check``.

    Nothing changes where the supernet offers one source: it was never trained (or trained with a
    robust loss, which trades clean fidelity for robustness by design) and has no BatchNorm."""
    offered = scorer.candidates()
    if len(offered) == 1 or not finalists:
        return
    for f in finalists:
        scored: list[tuple[Source, float]] = []
        modules: dict[Source, nn.Module] = {offered[0]: f.module}
        for source in offered:
            if source not in modules:
                with scorer.prepared(f.config, source, calib):
                    modules[source] = extract(scorer.net, f.config).module
            scored.append((source, float(scorer.score_module(modules[source]))))
        kept, accuracy = best_of(scored)
        by_weights = {w: max((a for s, a in scored if s.weights == w), default=None) for w in ("trained", "untrained")}
        f.weights_check = {**{w: a for w, a in by_weights.items() if a is not None},
                           "kept": kept.weights, "statistics": kept.stats,
                           "scores": {scorer.label(s): a for s, a in scored}}
        f.accuracy = accuracy
        if kept != offered[0]:
            f.module = modules[kept]
            f.artifact = None  # built from other weights; the lowering pass builds the shipped one
