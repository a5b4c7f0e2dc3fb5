"""The CLI's torch threads follow the cores free at start (``potstill.threads``)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from potstill import threads


@pytest.fixture
def all_threads(monkeypatch: pytest.MonkeyPatch):
    """torch sized to every usable core, as outside pytest-xdist; put back afterwards."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(threads.usable_cores())
    yield threads.usable_cores()
    torch.set_num_threads(before)


@pytest.mark.skipif(threads.usable_cores() < 2, reason="needs two cores: one busy, one free")
def test_a_busy_core_takes_a_thread_away_and_it_is_said(all_threads: int) -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the loop is running before the cores are sampled
        notes: list[str] = []
        got = threads.fit_threads_to_free_cores(notes.append)
    finally:
        busy.kill()
        busy.wait()
    assert got is not None and 1 <= got < all_threads and torch.get_num_threads() == got
    assert len(notes) == 1 and f"torch uses {got} thread" in notes[0] and "OMP_NUM_THREADS" in notes[0]


def test_omp_num_threads_is_the_users_choice(all_threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", str(all_threads))
    notes: list[str] = []
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert threads.fit_threads_to_free_cores(notes.append) is None
    finally:
        busy.kill()
        busy.wait()
    assert torch.get_num_threads() == all_threads and notes == []
