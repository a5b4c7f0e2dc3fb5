"""Hardware-aligned widths: rounding rules and the latency-table choice."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from potstill.passes.prune.align import align_units, channel_multiple, choose_width, unit_step


def test_rounds_to_the_multiple():
    assert align_units(19.2, 64, 1, 8) == 16  # Torch-Pruning's 19 of 64 at ratio 0.7
    assert align_units(44.8, 64, 1, 8) == 48  # 45 of 64 at ratio 0.3
    assert align_units(44.8, 64, 1, 16) == 48
    assert align_units(20.0, 64, 1, 8) == 24  # tie: keep more


def test_never_zero_never_above():
    assert align_units(0.0, 64, 1, 8) == 8
    assert align_units(2.0, 6, 1, 8) == 6  # only the full width is aligned-or-original
    assert align_units(100.0, 64, 1, 8) == 64
    assert align_units(61.0, 60, 1, 8) == 60


def test_heads_round_in_heads():
    assert unit_step(32, 8) == 1 and unit_step(4, 8) == 2
    assert align_units(6.4, 12, 32, 8) == 6
    assert align_units(5.0, 12, 4, 8) == 6  # 4-channel units: two units per 8 channels


def test_profile_multiple():
    class P:
        channel_multiple = 16

    assert channel_multiple(P()) == 16 and channel_multiple(None) == 8 and channel_multiple(P(), 4) == 4


def test_latency_table_choice():
    class Table:
        def __init__(self) -> None:
            self.asked: list[int] = []

        def best_width(self, op: str, candidates: list[int], **shape: object) -> int:
            self.asked = list(candidates)
            return 40 if 40 in candidates else max(candidates)

    table = Table()
    k, how = choose_width(38.0, 64, 1, 8, table=table, op="conv2d", shape={"cin": 64, "kernel": 3, "hw": 56})
    assert (k, how) == (40, "latency-table") and 40 in table.asked and min(table.asked) >= 30
    # never wider than asked: 0.5 of 32 channels offers 16 and below, whatever the table prefers
    k, how = choose_width(16.0, 32, 1, 8, table=table, op="conv2d", shape={"cin": 32, "kernel": 3, "hw": 56})
    assert max(table.asked) == 16 and k <= 16
    # heads: candidates are passed in channels and come back in units
    k, _ = choose_width(4.0, 12, 32, 8, table=table, op="linear", shape={"cin": 384, "tokens": 64})
    assert all(c % 32 == 0 for c in table.asked) and 1 <= k <= 12
    assert choose_width(19.2, 64, 1, 8) == (16, "aligned")


@given(st.floats(-5, 500, allow_nan=False), st.integers(1, 300), st.sampled_from([1, 2, 4, 16, 32, 64]),
       st.sampled_from([1, 4, 8, 16, 32]))
def test_alignment_properties(target, n, unit_channels, multiple):
    k = align_units(target, n, unit_channels, multiple)
    assert 1 <= k <= n
    step = unit_step(unit_channels, multiple)
    assert k == n or (k * unit_channels) % multiple == 0 or k % step == 0
