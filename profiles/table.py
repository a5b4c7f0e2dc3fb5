"""Measured latency tables: per op type and width, with lookup and width choice.

Rows are ``conv2d`` (cin, cout, kernel, hw, groups, stride), ``linear`` (cin, cout, tokens) and,
optionally, whole ``model`` rows (name). ``lookup`` answers any shape from the measured rows:

1. a row with exactly the asked shape answers directly (so a slow measured width shows);
2. otherwise rows of the same kind (kernel, stride, and dense / depthwise / grouped for convs) at the
   measured size nearest the asked one (``hw`` for convs, ``tokens`` for linears, nearest in log
   scale) form a curve of latency against work, ``cin·cout/groups`` (the MACs at that size) — only
   the rows with the asked ``cin`` when there are at least two of them (a layer whose output width is
   being chosen), else all of them;
   the latency is interpolated linearly in work between the two neighbouring rows, scaled in
   proportion to work above the largest row and held at the smallest row's latency below it;
3. the result is scaled by ``(hw/hw₀)²`` (convs) or ``tokens/tokens₀`` (linears) from the measured
   size to the asked one.

``best_width`` picks, among candidate widths, the one that does the most work per millisecond
(MACs/ms); candidates within 3 % of the best throughput are tied and the widest of them wins. A
width that lands on a slow kernel shape (45 of 64 channels, say) has low throughput and is never
chosen over an aligned neighbour.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Op = Literal["conv2d", "linear", "model"]

_REQUIRED: dict[str, tuple[str, ...]] = {
    "conv2d": ("cin", "cout", "kernel", "hw", "groups", "stride"),
    "linear": ("cin", "cout", "tokens"),
    "model": ("name",),
}
_SHAPE_KEYS = ("cin", "cout", "kernel", "hw", "groups", "stride", "tokens")
#: throughputs within this fraction of the best are tied in ``best_width``
TIE_FRACTION = 0.03


class LatencyEntry(BaseModel):
    """One measured row: an op at one shape and its median latency in milliseconds."""

    model_config = ConfigDict(extra="forbid")

    op: Op
    ms: float = Field(gt=0)
    cin: int | None = Field(default=None, ge=1)
    cout: int | None = Field(default=None, ge=1)
    kernel: int | None = Field(default=None, ge=1)
    hw: int | None = Field(default=None, ge=1)
    groups: int | None = Field(default=None, ge=1)
    stride: int | None = Field(default=None, ge=1)
    tokens: int | None = Field(default=None, ge=1)
    name: str | None = None

    @model_validator(mode="after")
    def _has_shape(self) -> LatencyEntry:
        missing = [k for k in _REQUIRED[self.op] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a '{self.op}' row needs {', '.join(missing)}")
        return self

    def key(self) -> tuple[Any, ...]:
        return (self.op, self.name, *(getattr(self, k) for k in _SHAPE_KEYS))


class LatencyTable(BaseModel):
    """Latencies measured on one device with one runtime; see the module docstring for lookup."""

    model_config = ConfigDict(extra="forbid")

    runtime: str = "onnxruntime"
    precision: str = "fp32"
    threads: int | None = None
    batch: int = 1
    measured_on: str = ""
    entries: list[LatencyEntry] = Field(default_factory=list)

    def has(self, op: str, **shape: Any) -> bool:
        probe = _normalise(op, shape)
        return any(e.key() == _entry_key(op, probe) for e in self.entries)

    def lookup(self, op: str, **shape: Any) -> float:
        """Latency in ms of ``op`` at ``shape`` (see the module docstring for the rule).

        >>> table.lookup("conv2d", cin=64, cout=48, kernel=3, hw=56)  # doctest: +SKIP
        """
        rows = [e for e in self.entries if e.op == op]
        if not rows:
            raise LookupError(f"latency table has no '{op}' rows (ops measured: {self.ops()})")
        if op == "model":
            name = shape.get("name")
            for e in rows:
                if e.name == name:
                    return e.ms
            raise LookupError(f"latency table has no model row named {name!r}")
        query = _normalise(op, shape)
        exact = [e.ms for e in rows if e.key() == _entry_key(op, query)]
        if exact:
            return sum(exact) / len(exact)
        rows = _same_kind(rows, op, query)
        size_key = "hw" if op == "conv2d" else "tokens"
        size = query[size_key]
        size0 = min({getattr(e, size_key) for e in rows}, key=lambda s: abs(math.log(s / size)))
        at_size = [e for e in rows if getattr(e, size_key) == size0]
        same_cin = [e for e in at_size if e.cin == query["cin"]]
        curve = sorted((_work(e.cin, e.cout, e.groups), e.ms) for e in (same_cin if len(same_cin) >= 2 else at_size))
        ms = _interpolate(curve, _work(query["cin"], query["cout"], query.get("groups")))
        scale = (size / size0) ** 2 if op == "conv2d" else size / size0
        return ms * scale

    def best_width(self, op: str, candidates: Sequence[int], **shape: Any) -> int:
        """The candidate output width with the most work per ms (ties within 3 %: the widest).

        Each candidate is the layer's ``cout``; ``cin`` is taken from ``shape`` or, when absent,
        set to the candidate too (a layer inside a pruned chain). Depthwise convs
        (``groups="depthwise"`` or groups equal to the width) use the candidate for groups too.
        """
        if not candidates:
            raise ValueError("best_width needs at least one candidate width")
        scored: list[tuple[float, int]] = []
        for width in sorted(set(candidates)):
            query = dict(shape)
            query["cout"] = width
            query.setdefault("cin", width)
            if query.get("groups") == "depthwise":
                query["groups"] = query["cin"] = width
            q = _normalise(op, query)
            work = _work(q["cin"], q["cout"], q.get("groups"))
            scored.append((work / self.lookup(op, **q), width))
        best = max(t for t, _ in scored)
        return max(w for t, w in scored if t >= best * (1 - TIE_FRACTION))

    def ops(self) -> list[str]:
        return sorted({e.op for e in self.entries})

    def merged(self, rows: Sequence[LatencyEntry]) -> LatencyTable:
        """A copy with ``rows`` added; a new row replaces an old one of the same shape."""
        by_key = {e.key(): e for e in self.entries}
        for r in rows:
            by_key[r.key()] = r
        return self.model_copy(update={"entries": list(by_key.values())})


def _normalise(op: str, shape: dict[str, Any]) -> dict[str, Any]:
    unknown = set(shape) - set(_SHAPE_KEYS) - {"name"}
    if unknown:
        raise TypeError(f"unknown shape key(s) {sorted(unknown)} for op '{op}'")
    q = dict(shape)
    if op in ("conv2d", "linear") and ("cin" not in q or "cout" not in q):
        raise TypeError(f"'{op}' lookup needs cin and cout")
    if op == "conv2d":
        q.setdefault("kernel", 3)
        q.setdefault("groups", 1)
        q.setdefault("stride", 1)
        q.setdefault("hw", 56)
    elif op == "linear":
        q.setdefault("tokens", 1)
    return q


def _entry_key(op: str, q: dict[str, Any]) -> tuple[Any, ...]:
    return (op, q.get("name"), *(q.get(k) for k in _SHAPE_KEYS))


def _conv_kind(cin: int | None, cout: int | None, groups: int | None) -> str:
    if not groups or groups == 1:
        return "dense"
    return "depthwise" if groups == cin == cout else "grouped"


def _same_kind(rows: list[LatencyEntry], op: str, q: dict[str, Any]) -> list[LatencyEntry]:
    """Rows of the same kernel/stride/conv kind, relaxing to the nearest kernel when none match."""
    if op != "conv2d":
        return rows
    kind = _conv_kind(q["cin"], q["cout"], q["groups"])
    same = [e for e in rows if _conv_kind(e.cin, e.cout, e.groups) == kind] or rows
    kernel = min({e.kernel or 1 for e in same}, key=lambda k: abs(k - q["kernel"]))
    same = [e for e in same if e.kernel == kernel]
    stride = min({e.stride or 1 for e in same}, key=lambda s: abs(s - q["stride"]))
    return [e for e in same if e.stride == stride]


def _work(cin: int | None, cout: int | None, groups: int | None) -> float:
    return float((cin or 1) * (cout or 1)) / float(groups or 1)


def _interpolate(curve: list[tuple[float, float]], work: float) -> float:
    if work <= curve[0][0]:
        return curve[0][1]
    if work >= curve[-1][0]:
        w_end, ms_end = curve[-1]
        return ms_end * work / w_end
    for (w0, m0), (w1, m1) in itertools.pairwise(curve):
        if w0 <= work <= w1:
            if w1 == w0:
                return min(m0, m1)
            return m0 + (m1 - m0) * (work - w0) / (w1 - w0)
    return curve[-1][1]
