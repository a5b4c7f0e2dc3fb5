"""Latency measurement: warm-up, then median and p90 of repeated runs within a time box.

One routine times every runtime (ONNX Runtime sessions, PyTorch modules, AOTInductor packages) so
their numbers compare: ``warmup`` untimed calls, then timed calls until ``max_runs`` or ``budget_s``
seconds have passed (at least ``min_runs``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from potstill.errors import PotstillError


def time_callable(
    fn: Callable[[], Any],
    warmup: int = 3,
    min_runs: int = 5,
    max_runs: int = 200,
    budget_s: float = 1.0,
) -> dict[str, float]:
    """``{"median", "p90", "runs"}`` in milliseconds of calling ``fn``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    ordered = sorted(times_ms)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median": statistics.median(ordered), "p90": p90, "runs": float(len(ordered))}


def measure_torch_latency(
    module: torch.nn.Module,
    inputs: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    budget_s: float = 1.0,
) -> dict[str, float]:
    """Time ``module(*inputs, **kwargs)`` in inference mode the way engines are timed.

    Hugging Face teachers take keyword inputs only (``input_ids=...``): pass the example's
    ``kwargs`` too, or there is nothing to call the module with.
    """
    kwargs = kwargs or {}
    if not inputs and not kwargs:
        raise PotstillError(f"measure_torch_latency({type(module).__name__}): no inputs; pass the example's "
                            "positional inputs and its keyword inputs (kwargs=...), as Hugging Face models take")
    module.eval()
    with torch.inference_mode():
        return time_callable(lambda: module(*inputs, **kwargs), budget_s=budget_s)
