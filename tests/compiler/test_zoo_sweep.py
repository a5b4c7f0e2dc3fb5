"""The registry sweep on a sample: one class per failure kind that was fixed, through the real
``potstill compile hf:DIR --ratio 0.5 --no-distill``, reload and engine parity at another batch and
length (``zoo_sweep_lib.sweep_class``). The whole sweep is ``bench/zoo_sweep.py``."""

from __future__ import annotations

import pytest

from .zoo_sweep_lib import sweep_class

pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize(("task", "model_type", "cls"), [
    ("qa", "bert", "BertForQuestionAnswering"),
    ("seq2seq", "t5", "T5ForConditionalGeneration"),
    ("audio-cls", "wav2vec2", "Wav2Vec2ForSequenceClassification"),
    ("base", "bloom", "BloomModel"),
])  # fmt: skip
def test_sweep_sample_passes(task, model_type, cls, tmp_path):
    row = sweep_class(task, model_type, cls, tmp_path)
    assert row["status"] == "pass", row
