"""Generality zoo, decoders: GPT-2 (Conv1D), GPT-NeoX, OPT, Llama / Mistral / Qwen2 / Gemma (GQA),
Qwen3 (qk-norm), Phi (partial rotary).
The check is ``zoo_hf_families.check_family`` (compile, reload, engine on fresh shapes)."""

from __future__ import annotations

import pytest

from .zoo_hf_families import check_family, zoo_params

pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo_params(("gpt2", "gpt-neox", "opt", "llama", "mistral", "qwen2", "qwen3", "phi", "gemma")))
def test_decoders_family(name: str, tmp_path) -> None:
    check_family(name, tmp_path)
