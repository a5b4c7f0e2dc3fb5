"""Hardware-aligned widths: kept unit counts the target runs fast.

Kernels vectorise channels in fixed lanes (8 FP32 lanes for AVX2, 16 for AVX-512, 8/16 for
tensor cores): 45 of 64 channels costs nearly what 48 costs, so odd widths waste most of the MACs
pruning saves (measured here: Torch-Pruning at ratio 0.7 on ResNet-18 keeps 19 of 64 channels and
delivers 0.44 of the speed-up its MACs promise). A group of ``n`` units of ``c`` channels each
keeps ``k`` units with ``k*c`` a multiple of the profile's ``channel_multiple`` ``M``:

    step = M / gcd(M, c)            (units; heads of 32 channels: step 1, i.e. rounded in heads)
    k    = the multiple of step nearest the target, in [step, n]; n itself is always allowed

so a width is never rounded to 0 nor above the original. With a measured latency table the width
is chosen instead among the aligned candidates at most one step (or 12.5 %) *narrower* than the
aligned target -- never wider, so a table cannot override what the user asked for -- by
``LatencyTable.best_width`` (most MACs per millisecond, ties to the widest), so no width lands on a
slow shape. What the table picked is recorded per group (``how: latency-table``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DEFAULT_MULTIPLE = 8


def channel_multiple(profile: Any, override: int = 0) -> int:
    """The multiple to align to: ``override`` if > 0, else the profile's, else 8."""
    if override > 0:
        return override
    value = getattr(profile, "channel_multiple", None)
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MULTIPLE


def unit_step(unit_channels: int, multiple: int) -> int:
    """Units per alignment step: ``multiple / gcd(multiple, unit_channels)``."""
    if multiple <= 1:
        return 1
    return multiple // math.gcd(multiple, max(unit_channels, 1))


def aligned_candidates(n_units: int, step: int) -> list[int]:
    """Every allowed kept count: multiples of ``step`` up to ``n_units``, and ``n_units``."""
    values = set(range(step, n_units + 1, step))
    values.add(n_units)
    return sorted(values)


def align_units(target: float, n_units: int, unit_channels: int = 1, multiple: int = DEFAULT_MULTIPLE) -> int:
    """The aligned kept count nearest ``target`` (ties: keep more); never 0, never above ``n_units``.

    >>> align_units(19.2, 64, 1, 8)    # Torch-Pruning's ratio 0.7 on 64 channels
    16
    >>> align_units(6.4, 12, 32, 8)    # heads of 32 channels: rounded in heads
    6
    """
    target = min(max(float(target), 1.0), float(n_units))
    step = unit_step(unit_channels, multiple)
    cands = aligned_candidates(n_units, step)
    return min(cands, key=lambda k: (abs(k - target), -k))


def choose_width(
    target: float,
    n_units: int,
    unit_channels: int,
    multiple: int,
    *,
    table: Any = None,
    op: str | None = None,
    shape: dict[str, Any] | None = None,
) -> tuple[int, str]:
    """(kept units, how chosen): from the latency table when it can answer, else aligned rounding.

    Candidates for the table are the aligned unit counts within max(one step, 12.5 %) of the target;
    ``shape`` is the producer layer's shape without ``cout`` (``cin``, ``kernel``, ``hw``, ...).
    """
    rounded = align_units(target, n_units, unit_channels, multiple)
    if table is None or op is None or shape is None or not hasattr(table, "best_width"):
        return rounded, "aligned"
    step = unit_step(unit_channels, multiple)
    slack = max(step, 0.125 * target)
    # only aligned widths are offered: a one-layer table cannot see the layout changes and
    # reorders that an odd width costs the whole model; and none wider than the aligned width
    # asked for, so the table can spend the user's budget better but never exceed it
    cands: Sequence[int] = [k for k in aligned_candidates(n_units, step)
                            if k <= rounded and target - k <= slack] or [rounded]
    try:
        best = table.best_width(op, [k * unit_channels for k in cands], **shape)
    except (LookupError, TypeError, ValueError):
        return rounded, "aligned"
    return max(1, min(n_units, int(best) // max(unit_channels, 1))), "latency-table"
