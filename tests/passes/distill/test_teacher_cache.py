"""Distillation from cached teacher outputs: the same training as with the live teacher when the
whole output is kept, close with top-k logits, and an error on a batch the cache never saw."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from potstill.errors import InputError
from potstill.inputs.data import Batch
from potstill.passes.distill import DistillTrainer, TensorBatches, TrainConfig
from potstill.passes.distill.capture import run_model
from potstill.passes.distill.teacher_cache import TeacherCache
from torch import nn

from .conftest import mlp


def _train(teacher: nn.Module | None, x: torch.Tensor, y: torch.Tensor, cache: TeacherCache | None) -> nn.Module:
    student = mlp(8, 16, 5, seed=3)
    cfg = TrainConfig(epochs=2, lr=1e-2, progress=False)
    outputs = cache.outputs if cache is not None else None
    DistillTrainer(student, teacher, "kd", cfg, temperature=2.0, teacher_outputs=outputs).fit(
        TensorBatches(x, y, batch_size=64, shuffle=False))
    return student


def test_full_cache_trains_exactly_like_the_live_teacher(
    teacher_data: tuple[nn.Module, torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    teacher, x, y = teacher_data
    x, y = x[:256], y[:256]
    cache = TeacherCache(tmp_path / "cache")
    assert cache.build(teacher, TensorBatches(x, y, batch_size=64, shuffle=False)) == 4
    assert len(cache) == 4
    live, cached = _train(teacher, x, y, None), _train(None, x, y, cache)
    for a, b in zip(live.parameters(), cached.parameters()):
        torch.testing.assert_close(a, b)


def test_top_k_keeps_the_head_of_the_distribution(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 500)).eval()  # a 500-token "vocabulary"
    ids = torch.randint(0, 50, (4, 6))
    cache = TeacherCache(tmp_path / "cache", top_k=32)
    cache.build(teacher, [Batch((ids,))])
    got = cache.outputs(Batch((ids,))).logits
    with torch.no_grad():
        full = teacher(ids)
    p_full, p_top = full.softmax(-1), got.softmax(-1)
    top = full.topk(32, dim=-1).indices
    assert torch.equal(got.gather(-1, top), full.gather(-1, top))  # the kept entries are exact
    # the top-k distribution, renormalised: zero tail mass, kept entries scaled up by 1/coverage
    coverage = p_full.gather(-1, top).sum(-1, keepdim=True)
    torch.testing.assert_close(p_top.gather(-1, top), p_full.gather(-1, top) / coverage, rtol=1e-5, atol=1e-7)
    assert float(p_top.sum(-1).sub(1).abs().max()) < 1e-5 and torch.isfinite(got).all()


def test_hidden_states_round_trip(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=32, vocab_size=64)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    batch = Batch((), {"input_ids": torch.randint(0, 64, (2, 5))})
    from potstill.passes.distill.capture import Want

    cache = TeacherCache(tmp_path / "cache", top_k=8)
    cache.build(teacher, [batch], want=Want(hidden=True))
    with torch.no_grad():
        live = run_model(teacher, batch, Want(hidden=True))
    got = cache.outputs(batch)
    assert len(got.hidden) == 2 and got.embeddings is not None
    torch.testing.assert_close(got.hidden[1], live.hidden[1])


def test_unseen_batch_is_an_error(teacher_data: tuple[nn.Module, torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    teacher, x, _ = teacher_data
    cache = TeacherCache(tmp_path / "cache")
    cache.build(teacher, [Batch((x[:8],))])
    with pytest.raises(InputError, match="differs from the data the cache was built on"):
        cache.outputs(Batch((x[8:16],)))
    with pytest.raises(InputError, match="top_k"):
        TeacherCache(tmp_path / "c2", top_k=0)
