"""Lowering HF decoders without wasted work: Optimum is skipped for students whose shapes differ from
the saved teacher, and a decoder teacher's Optimum graph (with ``position_ids``) passes parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from potstill.targets import lower
from potstill.targets.optimum_export import differs_from_saved
from torch import nn

transformers = pytest.importorskip("transformers")


@pytest.fixture
def llama_dir(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=128, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_shapes_tell_a_student_from_the_saved_teacher(llama_dir: tuple[nn.Module, Path]) -> None:
    model, path = llama_dir
    assert not differs_from_saved(model, {"path": str(path)})
    mlp = model.model.layers[0].mlp
    mlp.up_proj = nn.Linear(32, 48, bias=False)  # a width-pruned student
    assert differs_from_saved(model, {"path": str(path)})
    assert not differs_from_saved(model, {"path": str(path.parent / "missing")})  # cannot tell: not "differs"


def test_decoder_teacher_through_optimum_and_student_skips_it(llama_dir: tuple[nn.Module, Path], tmp_path: Path) -> None:
    pytest.importorskip("optimum.exporters.onnx")
    model, path = llama_dir
    kwargs = {"input_ids": torch.randint(0, 128, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    hf = {"path": str(path), "task": "text-generation"}
    art = lower(model, (), "cpu", tmp_path / "teacher", example_kwargs=kwargs, hf=hf)
    assert art.parity["ok"] and any("exported with Optimum" in n for n in art.notes), art.notes
    model.model.layers[0].mlp.gate_proj = nn.Linear(32, 48, bias=False)
    model.model.layers[0].mlp.up_proj = nn.Linear(32, 48, bias=False)
    model.model.layers[0].mlp.down_proj = nn.Linear(48, 32, bias=False)
    art2 = lower(model, (), "cpu", tmp_path / "student", example_kwargs=kwargs, hf=hf)
    assert art2.parity["ok"] and any("Optimum not tried" in n for n in art2.notes), art2.notes


def test_large_teacher_skips_optimum_for_external_data(
    llama_dir: tuple[nn.Module, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from potstill.targets import large_onnx

    monkeypatch.setattr(large_onnx, "EXTERNAL_DATA_THRESHOLD", 1024)
    model, path = llama_dir
    kwargs = {"input_ids": torch.randint(0, 128, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    art = lower(model, (), "cpu", tmp_path / "teacher", example_kwargs=kwargs, hf={"path": str(path)})
    assert art.parity["ok"] and any("Optimum not used for a model this large" in n for n in art.notes), art.notes
    assert (tmp_path / "teacher" / "model.onnx.data").is_file() and "onnx_data" in art.files
