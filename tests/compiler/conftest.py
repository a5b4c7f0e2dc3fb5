"""Fixtures shared by the compiler tests."""

from __future__ import annotations

from collections.abc import Iterator

import potstill.pipeline as pl
import pytest
from potstill.pipeline import Pass


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
