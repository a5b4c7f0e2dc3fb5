"""The distill pass with ``teacher_outputs=cached``: the same student as the live teacher gives, the
teacher run only while the cache is built, top-k that still teaches, and errors where a cache cannot work."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from potstill.errors import InputError
from potstill.passes.distill import TensorBatches
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState, Student
from torch import nn

from .conftest import mlp


def _state(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, work: Path | None) -> CompileState:
    state = CompileState(teacher, (x[:2],), out_dir=None, train_data=TensorBatches(x[:192], y[:192], batch_size=32))
    state.work_dir = work
    state.students.append(Student("narrow", mlp(8, 16, 5, seed=3)))
    return state


def _distill(teacher_data, work: Path | None, spec: str, epochs: int = 2) -> CompileState:
    teacher, x, y = teacher_data
    state = _state(teacher, x, y, work)
    PassManager(build_pipeline(f"distill{{epochs={epochs},lr=0.01,temperature=2,progress=false{spec}}}")).run(state)
    return state


def test_cached_outputs_train_the_same_student_as_the_live_teacher(teacher_data, tmp_path: Path, capsys) -> None:
    live = _distill(teacher_data, None, "")
    calls = []
    teacher_data[0].register_forward_hook(lambda *_: calls.append(1))
    cached = _distill(teacher_data, tmp_path, ",teacher_outputs=cached")
    # shuffled anew each epoch: 2 epochs x 6 batches, each run through the teacher once, never during training
    assert len(calls) == 12
    for a, b in zip(live.working().module.parameters(), cached.working().module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    m = cached.working().metrics["distill"]["teacher_outputs"]
    assert m["mode"] == "cached" and m["batches"] == 12 and m["files"] == 12 and m["top_k"] is None
    folder = Path(m["dir"])
    assert folder.parent == tmp_path / "teacher-cache" and len(list(folder.glob("*.safetensors"))) == 12
    assert "precomputed for 12 training batches" in capsys.readouterr().err
    assert live.working().metrics["distill"]["teacher_outputs"] == "live"
    # a re-run with the same teacher reuses the cache: the teacher does not run again
    _distill(teacher_data, tmp_path, ",teacher_outputs=cached")
    assert len(calls) == 12


def test_a_changed_teacher_gets_a_new_cache_and_the_old_one_goes(teacher_data, tmp_path: Path) -> None:
    first = Path(_distill(teacher_data, tmp_path, ",teacher_outputs=cached").working().metrics["distill"]
                 ["teacher_outputs"]["dir"])  # fmt: skip
    mine = first.parent / "user-notes"
    mine.mkdir()
    with torch.no_grad():
        teacher_data[0][0].bias.add_(0.1)
    second = Path(_distill(teacher_data, tmp_path, ",teacher_outputs=cached").working().metrics["distill"]
                  ["teacher_outputs"]["dir"])  # fmt: skip
    assert second != first and not first.exists() and mine.is_dir()  # never deletes what it did not write


def test_top_k_trains_and_the_temporary_cache_is_removed(teacher_data, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the pass's temporary cache goes
    teacher, x, _ = teacher_data
    before = _agreement(mlp(8, 16, 5, seed=3), teacher, x[384:])
    state = _distill(teacher_data, None, ",teacher_outputs=cached,teacher_top_k=2", epochs=6)
    m = state.working().metrics["distill"]["teacher_outputs"]
    assert m["top_k"] == 2 and m["files"] == 36 and m["dir"] is None
    live = _distill(teacher_data, None, "", epochs=6)
    top2, full = (_agreement(s.working().module, teacher, x[384:]) for s in (state, live))
    assert top2 > before + 0.2 and abs(top2 - full) < 0.1, (before, top2, full)
    assert not list(tmp_path.iterdir())  # no work folder: the cache was temporary, and is gone


def _agreement(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean())


@pytest.mark.parametrize(("spec", "match"), [
    ("teacher_outputs=disk", "teacher_outputs must be live or cached"),
    ("teacher_top_k=8", "applies to cached teacher outputs only; add teacher_outputs=cached"),
    ("teacher_outputs=cached,teacher_top_k=0", "teacher_top_k must be >= 1"),
    ("method=attention,teacher_outputs=cached", "needs teacher_outputs=live.*attention maps"),
    ("method=kd+attention,teacher_outputs=cached", "needs teacher_outputs=live"),
])  # fmt: skip
def test_options_a_cache_cannot_honour_are_errors(spec: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        build_pipeline(f"distill{{{spec}}}")


@pytest.mark.parametrize("method", [
    "adaspec,ref_steps=3",  # its reference student learns from the cache too
    "cema",
    "hidden,student_modules=[0],teacher_modules=[0]",  # hidden states are cached beside the logits
    "rslad,pgd_steps=2,clamp=false",  # the attack perturbs the student's input only; the teacher sees x
    "cosine",
])  # fmt: skip
def test_every_method_but_attention_trains_the_same_from_the_cache(teacher_data, method: str) -> None:
    teacher, x, y = teacher_data
    weights = []
    for mode in ("live", "cached"):
        state = CompileState(teacher, (x[:2],), out_dir=None, train_data=TensorBatches(x[:96], y[:96], batch_size=32))
        state.students.append(Student("narrow", mlp(8, 16, 5, seed=3)))
        spec = f"distill{{method={method},epochs=2,progress=false,teacher_outputs={mode}}}"
        PassManager(build_pipeline(spec)).run(state)
        weights.append(torch.cat([p.detach().flatten() for p in state.working().module.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-6)
