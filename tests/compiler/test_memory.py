"""The compile's memory estimate: weights read from safetensors headers without loading, the parts
scale with the teacher and the number of students, and a compile that cannot fit is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from potstill.errors import InputError
from potstill.inputs.memory import (
    STUDENT_FACTOR,
    check_fits,
    estimate_compile_memory,
    hf_dir_weights,
    module_weights,
    parse_size,
    preflight_memory,
)
from safetensors.torch import save_file
from torch import nn


def test_safetensors_headers_give_the_loaded_sizes(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 7)).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert hf_dir_weights(tmp_path) == module_weights(model) == (100 * 16 + 16 * 7 + 7, 2 * (100 * 16 + 16 * 7 + 7))
    assert hf_dir_weights(tmp_path / "nothing-here") is None


def test_estimate_grows_with_teacher_and_students() -> None:
    small, big = estimate_compile_memory(10_000_000), estimate_compile_memory(100_000_000)
    three = estimate_compile_memory(100_000_000, students=3)
    assert big.peak_bytes - small.peak_bytes == pytest.approx(9 * (small.peak_bytes - small.parts["runtime"]))
    assert three.peak_bytes - big.peak_bytes == pytest.approx(2 * STUDENT_FACTOR * 400_000_000, abs=2)  # two more students
    half = estimate_compile_memory(100_000_000, 200_000_000)  # bf16 teacher
    assert half.parts["teacher"] == big.parts["teacher"] // 2 and half.peak_bytes < big.peak_bytes
    assert "3 students" in three.text() and "100M parameters" in three.text()


def test_refuses_what_does_not_fit() -> None:
    est = estimate_compile_memory(1_000_000_000)  # a 1B fp32 teacher needs several GB
    with pytest.raises(InputError, match=r"exceeds --max-memory \(2\.0 GB\)"):
        check_fits(est, max_memory=parse_size("2G"), available=10**12)
    with pytest.raises(InputError, match="memory available on this machine"):
        check_fits(est, available=10**9)
    check_fits(est, max_memory=None, available=10**12)  # fits: no error


@pytest.mark.parametrize(("text", "expected"), [("12G", 12 * 10**9), ("1500M", 1_500_000_000),
                                                ("8GiB", 8 * 2**30), ("2.5gb", 2_500_000_000), ("4096", 4096)])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "12X", "-1G"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(InputError, match="--max-memory"):
        parse_size(bad)


def test_preflight_sizes_an_hf_folder_before_loading(tmp_path: Path) -> None:
    model = nn.Linear(1000, 1000)  # 1M parameters
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    lines: list[str] = []
    est = preflight_memory(f"hf:{tmp_path}", max_memory=10**12, note=lines.append)
    assert est is not None and est.params == 1_001_000 and lines == [est.text()]
    with pytest.raises(InputError, match="--max-memory"):
        preflight_memory(f"hf:{tmp_path}", max_memory=10**6, note=lines.append)
    assert preflight_memory("examples/x.py:make", note=lines.append) is None  # sized once loaded
    assert preflight_memory(model, max_memory=10**12, note=lines.append) is not None
