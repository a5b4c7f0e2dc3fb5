"""Generality zoo, BERT-like encoders: BERT, ALBERT (shared layers), DeBERTa-v2 (disentangled attention), ELECTRA,
DistilBERT, MPNet, RoBERTa.
The check is ``zoo_hf_families.check_family`` (compile, reload, engine on fresh shapes)."""

from __future__ import annotations

import pytest

from .zoo_hf_families import check_family, zoo_params

pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo_params(("bert", "albert", "deberta-v2", "electra", "distilbert", "mpnet", "roberta")))
def test_text_family(name: str, tmp_path) -> None:
    check_family(name, tmp_path)
