"""AOTInductor: one package compiled, loaded in a child process, matching PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from potstill.errors import PotstillError
from potstill.targets import lower
from potstill.targets.aoti import _child_failure, run_package_in_child
from torch import nn


def test_aoti_package_loads_and_matches(cnn: nn.Module, tmp_path: Path) -> None:
    with torch._inductor.config.patch(compile_threads=1):
        art = lower(cnn, (torch.randn(1, 3, 16, 16),), "cpu", tmp_path, target="aoti")
    assert art.target == "aoti" and art.files["pt2"].is_file()
    assert art.parity["ok"] and art.parity["max_abs"] < 1e-4
    assert art.parity["n_inputs"] == 4  # example, two random, another batch size (dynamic batch)
    assert art.latency_ms["median"] > 0
    assert any("child process" in n for n in art.notes)


def test_child_failures_become_clear_errors(tmp_path: Path) -> None:
    bogus = tmp_path / "broken.pt2"
    bogus.write_bytes(b"not a package")
    with pytest.raises(PotstillError, match="loading or running the AOTInductor package failed"):
        run_package_in_child(bogus, [[torch.zeros(1)]], "cpu")
    message = _child_failure(bogus, -11, "Fatal Python error: Segmentation fault")
    assert "SIGSEGV" in message and "crashed" in message and str(bogus) in message
