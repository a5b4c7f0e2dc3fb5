"""Fixtures shared by the compiler tests."""

from __future__ import annotations

from collections.abc import Iterator

import potstill.pipeline as pl
import pytest
from potstill.pipeline import Pass


@pytest.fixture
def registry() -> Iterator[dict[str, type[Pass]]]:
    """The pass registry, restored after the test (tests register throwaway passes)."""
    saved = dict(pl._REGISTRY)
    try:
        yield pl._REGISTRY
    finally:
        pl._REGISTRY.clear()
        pl._REGISTRY.update(saved)
