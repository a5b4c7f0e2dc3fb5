"""AmoebaLLM's dynamic programme for layer removal: the best mask for every removal count at once.

Given ``N`` candidate blocks in order and a metric ``f(removed) -> float`` (higher is better),

    S[n][m] = best set of ``m`` removed blocks among the *last* ``n`` candidates
    S[0][0] = {}
    S[n][m] = argmax_f { S[n-1][m]  (block N-n kept),   S[n-1][m-1] + {block N-n} }

for ``m <= min(n, M)``. Each cell costs one metric evaluation (the "removed" candidate), so the
programme makes O(N * M) evaluations and ``S[N][m]`` is the mask for every ``m = 1..M`` in one run.
Fu et al., "AmoebaLLM: Constructing Any-Shape Large Language Models for Efficient and Instant
Deployment" (NeurIPS 2024, arXiv 2411.10606).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class DepthDPResult:
    """``masks[m]``: the blocks to remove for ``m`` removals; ``values[m]``: its metric."""

    masks: dict[int, tuple[str, ...]] = field(default_factory=dict)
    values: dict[int, float] = field(default_factory=dict)
    evaluations: int = 0

    def importance(self, names: Sequence[str]) -> dict[str, float]:
        """Per-block scores (higher = keep): how many of the masks keep the block, plus a small
        term for the first removal count at which it goes, so that ties break by the programme."""
        total = len(self.masks)
        scores = {}
        for name in names:
            kept = sum(name not in mask for mask in self.masks.values())
            first = min((m for m, mask in self.masks.items() if name in mask), default=total + 1)
            scores[name] = kept + first / (total + 2)
        return scores


def depth_dp(
    names: Sequence[str], metric: Callable[[frozenset[str]], float], max_removed: int
) -> DepthDPResult:
    """Run the programme over ``names`` (the candidate blocks in model order).

    ``metric(removed)`` evaluates the model with the blocks in ``removed`` taken out (higher is
    better). Example, a toy additive metric whose optimum is the ``m`` cheapest blocks::

        cost = {"a": 3.0, "b": 1.0, "c": 2.0}
        r = depth_dp(list(cost), lambda s: -sum(cost[x] for x in s), 2)
        r.masks[1] == ("b",);  set(r.masks[2]) == {"b", "c"}
    """
    n_total = len(names)
    max_removed = max(0, min(max_removed, n_total))
    cache: dict[frozenset[str], float] = {}
    result = DepthDPResult()

    def evaluate(removed: frozenset[str]) -> float:
        if removed not in cache:
            cache[removed] = float(metric(removed))
            result.evaluations += 1
        return cache[removed]

    empty: frozenset[str] = frozenset()
    prev: dict[int, frozenset[str]] = {0: empty}
    evaluate(empty)
    for n in range(1, n_total + 1):
        block = names[n_total - n]
        cur: dict[int, frozenset[str]] = {0: empty}
        for m in range(1, min(n, max_removed) + 1):
            candidates = []
            if m in prev:  # m <= n - 1: keep the block
                candidates.append(prev[m])
            candidates.append(prev[m - 1] | {block})
            cur[m] = max(candidates, key=evaluate)
        prev = cur
    order = {name: i for i, name in enumerate(names)}
    for m in range(1, max_removed + 1):
        result.masks[m] = tuple(sorted(prev[m], key=order.__getitem__))
        result.values[m] = cache[prev[m]]
    return result
