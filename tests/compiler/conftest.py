"""Fixtures shared by the compiler tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import potstill.pipeline as pl
import pytest
import torch
from potstill.pipeline import Pass


@pytest.fixture(autouse=True)
def _share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Under pytest-xdist each worker, and each CLI it starts, takes its share of the cores. A torch
    pool the size of the machine in every worker oversubscribes it, and spin-waiting OpenMP threads
    then slow every compile several times over (a digits compile took 200 s instead of 30)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        yield
        return
    share = max(1, (os.cpu_count() or 1) // workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(share)
    monkeypatch.setenv("OMP_NUM_THREADS", str(share))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def registry() -> Iterator[dict[str, type[Pass]]]:
    """The pass registry, restored after the test (tests register throwaway passes).

    Built-in passes whose module the test imported stay registered: their module is imported
    once per process, so it would not register them again.
    """
    saved = dict(pl._REGISTRY)
    try:
        yield pl._REGISTRY
    finally:
        loaded = {n: c for n, c in pl._REGISTRY.items() if n not in saved and pl.BUILTIN_PASSES.get(n) == c.__module__}
        pl._REGISTRY.clear()
        pl._REGISTRY.update(saved)
        pl._REGISTRY.update(loaded)
