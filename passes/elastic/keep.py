"""Training is kept per subnet only where it raises held-out fidelity.

The sandwich rule trains every subnet on the same shared weights, so it can lower the fidelity of
some subnets while it raises that of others; the largest starts *as* the teacher (the supernet is
the nested teacher) and can only lose. For each finalist configuration ``c`` the search extracts
two students, one from the trained weights ``θ`` and one from the weights before training ``θ₀``
(each after BatchNorm re-estimation for ``c``), scores both on the held-out batches

    A_θ(c) = score(extract(θ, c)),        A_θ₀(c) = score(extract(θ₀, c))

and ships the better one (ties go to the trained weights). The choice is per extracted subnet,
because the subnets share weights: a training that helps the small subnets and costs the large ones
keeps both gains. ``potstill.passes.distill`` applies the same rule to a plain student.

Measured on all-MiniLM-L6-v2 (sandwich training at lr 3e-5): the full-size subnet fell from a
held-out cosine of 1.0 to ~0.97 in FP32, so the trained weights were the worse ones there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .extract import extract
from .supernet import Supernet, recalibrate_bn


def trained_wins(trained: float, untrained: float) -> bool:
    """Whether the trained weights' score wins: ties go to them, and a non-finite score loses to a
    finite one."""
    return not math.isfinite(untrained) or (math.isfinite(trained) and trained >= untrained)


def settle_weights(net: Supernet, finalists: Sequence[Any], score: Callable[[nn.Module], float],
                   calib: Sequence[Any]) -> None:
    """Give each finalist (``search.Finalist``, its ``module`` extracted from the trained weights) the
    better of its trained and untrained subnet, in place; records both scores in ``weights_check``.

    Nothing changes where ``net`` keeps no weights from before training (it was never trained, or
    trained with a robust loss, which trades clean fidelity for robustness by design)."""
    if net.untrained is None or not finalists:
        return
    trained = [float(score(f.module)) for f in finalists]
    untrained: list[tuple[float, nn.Module]] = []
    with net.untrained_weights():
        for f in finalists:
            recalibrate_bn(net, f.config, calib)
            module = extract(net, f.config).module
            untrained.append((float(score(module)), module))
    for f, a_trained, (a_untrained, module) in zip(finalists, trained, untrained):
        keep_trained = trained_wins(a_trained, a_untrained)
        f.weights_check = {"trained": a_trained, "untrained": a_untrained,
                           "kept": "trained" if keep_trained else "untrained"}
        if keep_trained:
            f.accuracy = a_trained
            continue
        f.module, f.accuracy = module, a_untrained
        f.artifact = None  # built from the trained weights; the lowering pass builds the shipped one
