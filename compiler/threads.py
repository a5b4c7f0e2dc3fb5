"""torch's intra-op threads for the cores that are free when a compile starts.

torch sizes its pool to every core. When another process keeps some of them busy, each parallel
region waits at its barrier for a thread the scheduler has taken off its core: digits
``--elastic --students 3 --speedup 2`` beside one busy-loop process on a 2-core host had not
finished after 15 minutes with 2 threads, and took 190 s with 1 (95 s on the idle host;
``bench/elastic_cli.py digits --speedup 2 --busy``). The CLI measures how busy the cores are for a
moment before the heavy work and, where fewer are free than torch would use, uses that many.
``OMP_NUM_THREADS`` set by the user is left alone; the Python API leaves threads to its caller.
"""

from __future__ import annotations

import os
from collections.abc import Callable

#: how long the cores' load is sampled (seconds)
SAMPLE_S = 0.3


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_cores(sample_s: float = SAMPLE_S) -> int:
    """How many cores' worth of CPU other processes used over ``sample_s`` (this one sleeps)."""
    import psutil

    return round(sum(psutil.cpu_percent(interval=sample_s, percpu=True)) / 100)


def fit_threads_to_free_cores(note: Callable[[str], None]) -> int | None:
    """Lower torch's intra-op threads to the cores free now, saying so; returns the new count, or
    None when nothing changed (``OMP_NUM_THREADS`` set, or enough cores free)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores, threads = usable_cores(), torch.get_num_threads()
    busy = min(busy_cores(), cores)
    free = max(1, cores - busy)
    if free >= threads:
        return None
    torch.set_num_threads(free)
    note(f"note: {busy} of {cores} cores are busy with other work; torch uses {free} thread"
         f"{'s' if free > 1 else ''} instead of {threads} (set OMP_NUM_THREADS to choose)")
    return free
