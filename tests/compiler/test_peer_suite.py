"""A fast sample of the peer suite (``bench/peer_suite.py``): Torch-Pruning's own test models
(``bench/peer_models.py``) through ``potstill compile --ratio 0.5 --no-distill``, the real command
line in a child process. Each must exit 0, keep every output's shape (reloaded student and ONNX
engine), record engine parity as passing, and remove at least 20 % of the MACs; the two-input,
three-output model, whose every width is a model output, must exit 2 saying nothing is prunable
rather than change its outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import peer_suite  # noqa: E402


@pytest.mark.parametrize("name", [
    "concat_split",      # split, one part into a concat with a parallel path, the other added back
    "split_shared",      # a three-way split, two parts through one shared block, three outputs
    "height_cat",        # concat and split along the height, not the channels
    "customized_layer",  # x / ||x||_2 over the channels, per-channel scale and bias parameters
])
def test_peer_model_prunes_with_parity(name: str, tmp_path: Path) -> None:
    row = peer_suite.run_peer(name, tmp_path / name, ratio=0.5, timeout=240)
    assert row["exit"] == 0, row["reason"]
    assert row["student_shapes"] == row["teacher_shapes"], row
    assert row["engine_shapes"] == row["teacher_shapes"], row
    assert row["parity_ok"] is True and row["parity_max_abs"] < 1e-4, row
    assert row["engine_max_abs"] < 1e-4, row
    assert row["macs_after"] < row["macs_before"]
    assert row["macs_cut"] >= peer_suite.MIN_CUT, row
    assert row["status"] == "pass", row["reason"]


def test_model_outputs_are_kept_so_two_in_two_out_has_nothing_to_prune(tmp_path: Path) -> None:
    row = peer_suite.run_peer("two_in_two_out", tmp_path / "out", ratio=0.5, timeout=240)
    assert row["exit"] == 2
    assert row["status"] == "nothing-prunable", row["reason"]
    assert "no prunable groups" in row["reason"]
    assert not (tmp_path / "out" / "manifest.json").exists()
