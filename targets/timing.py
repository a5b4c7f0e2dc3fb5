"""Latency measurement: warm-up, then median and p90 of repeated runs within a time box.

One routine times every runtime (ONNX Runtime sessions, PyTorch modules, AOTInductor packages) so
their numbers compare: ``warmup`` untimed calls, then timed calls until ``max_runs`` or ``budget_s``
seconds have passed (at least ``min_runs``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
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


def timing_method(
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    warmup: int = 3,
    min_runs: int = 5,
    max_runs: int = 200,
    budget_s: float = 1.0,
) -> dict[str, Any]:
    """How latencies were measured, for the manifest: the bounded run count and the one shape timed.

    Engines are timed on the example inputs (the representative shape), not swept over shapes:
    ``warmup`` untimed calls, then between ``min_runs`` and ``max_runs`` timed calls within
    ``budget_s`` seconds, so timing a large model costs at most ``warmup + max(min_runs, budget)``.

    >>> timing_method((torch.zeros(1, 3, 8, 8),))["shapes"]
    {'input_0': [1, 3, 8, 8]}
    """
    shapes = {f"input_{i}": list(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    shapes.update({k: list(v.shape) for k, v in (kwargs or {}).items() if isinstance(v, torch.Tensor)})
    return {
        "statistic": "median and p90 (ms)",
        "warmup": warmup,
        "min_runs": min_runs,
        "max_runs": max_runs,
        "budget_s": budget_s,
        "shapes": shapes,
    }


def time_rounds(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int,
    per_round: int = 5,
    warmup: int = 2,
    first_round: int = 0,
) -> dict[str, list[float]]:
    """Interleaved A/B timing: per name, the median (ms) of ``per_round`` calls in each round.

    Round ``r`` calls every function in turn, in the given order when ``first_round + r`` is even
    and reversed when it is odd (A B, B A, ...), so that load which comes and goes between rounds
    hits all of them alike and their per-round ratios are steadier than any one time.
    ``first_round`` continues the alternation when more rounds are taken later (``warmup=0``).

    >>> sorted(time_rounds({"a": lambda: None, "b": lambda: None}, rounds=3))
    ['a', 'b']
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    order = list(fns)
    out: dict[str, list[float]] = {name: [] for name in order}
    for r in range(rounds):
        for name in order if (first_round + r) % 2 == 0 else reversed(order):
            fn = fns[name]
            times = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            out[name].append(statistics.median(times))
    return out


def session_options(threads: int | None, inter_op_threads: int | None = 1) -> Any:
    """ONNX Runtime options for a session potstill times: ``threads`` intra-op threads, and pools
    that sleep when a run ends.

    Every measurement here times two or more sessions in one process (student against teacher,
    sublayer against sublayer), and by default an ONNX Runtime pool spins on its cores after each
    run; the next session timed then competes with those spinning threads. Two sessions of one and
    the same model, timed interleaved with spinning pools, measured 0.7x to 2.1x "speed-ups"
    against each other on this 2-core host; without spinning, 1.00x +- 0.01.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = inter_op_threads or 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts
