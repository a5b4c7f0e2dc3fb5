"""One data story: ``--data`` / ``train_data()`` calibrates when neither ``--calib`` nor ``calib_data()`` exists."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from potstill.driver import Prepared, prepare
from potstill.outputs.report import warnings
from potstill.plan import CompileOptions

TEACHER = """
import torch
from torch import nn

def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()

def example_inputs():
    return (torch.zeros(1, 3, 8, 8),)

def train_data():
    g = torch.Generator().manual_seed(1)
    for _ in range(24):  # far from the random inputs' N(0, 1): mean 5, std 3
        yield 5.0 + 3.0 * torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)
"""


def _prepare(tmp_path: Path, extra: str = "") -> tuple[Prepared, list[str]]:
    path = tmp_path / "t.py"
    path.write_text(textwrap.dedent(TEACHER) + textwrap.dedent(extra))
    said: list[str] = []
    base = CompileOptions(teacher=f"{path}:teacher", out=str(tmp_path / "out"), profile="cpu", teacher_timing=False)
    return prepare(base, note=said.append), said


def _mean(batches: list) -> float:
    return float(torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in batches]).mean())


def test_train_data_calibrates_when_there_is_no_calib(tmp_path: Path) -> None:
    p, said = _prepare(tmp_path)
    calib = p.inputs["calib"]
    assert calib["source"] == "data" and not calib["random"]
    # all 24 batches (96 samples): past the first 16, data is read on while calibration has < 512 samples
    assert calib["batches"] == 18 and calib["heldout_batches"] == 6
    assert any(s.startswith("calibrating on train_data() in the teacher file: 18 batches, 6 held out") for s in said)
    assert any("72 calibration samples" in s and "noisy below 512" in s for s in said)
    assert not any("random" in s for s in said)
    state = p.state
    seen, held = list(state.calib_data()), list(state.heldout_data())
    assert abs(_mean(seen) - 5.0) < 0.2 and abs(_mean(held) - 5.0) < 0.3  # the data's statistics, not noise
    assert not any(any(a[0] is b[0] for b in held) for a in seen)  # held-out is disjoint from calibration


def test_a_long_stream_calibrates_on_just_enough_batches_for_512_samples(tmp_path: Path) -> None:
    extra = """
    def train_data():
        g = torch.Generator().manual_seed(1)
        for _ in range(1000):
            yield torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 2, (16,), generator=g)
    """
    p, said = _prepare(tmp_path, extra)
    calib = p.inputs["calib"]
    read = calib["batches"] + calib["heldout_batches"]
    assert calib["batches"] * 16 >= 512  # enough after the held-out quarter ...
    assert 0.75 * (read - 1) * 16 < 512  # ... and no more than needed to get there
    assert not any("noisy below" in s for s in said)


def test_calib_data_still_wins_over_train_data(tmp_path: Path) -> None:
    extra = """
    def calib_data():
        for _ in range(8):
            yield torch.zeros(2, 3, 8, 8)
    """
    p, said = _prepare(tmp_path, extra)
    assert p.inputs["calib"]["source"] == "calib"
    assert any(s.startswith("calibrating on calib_data() in the teacher file") for s in said)


def _manifest(pipeline: list[str], **elastic: object) -> dict:
    student = {"name": "s", "pipeline": pipeline, "fidelity": None, "metrics": {"elastic": elastic} if elastic else {}}
    return {"students": [student], "teacher": {}, "profile": {"min_fidelity": 0.9}}


@pytest.mark.parametrize(("pipeline", "warned"), [
    (["elastic.nest", "elastic.train{epochs=3}", "elastic.search{students=3}"], False),
    (["magnitude{ratio=0.5}", "distill{epochs=2}"], False),
    (["elastic.nest", "elastic.train{epochs=0}", "elastic.search{students=3}"], True),
    (["elastic.nest", "elastic.search{students=3}"], True),
    (["magnitude{ratio=0.5}"], True),
])  # fmt: skip
def test_not_distilled_reads_the_pipeline_that_ran(pipeline: list[str], warned: bool) -> None:
    assert any(w.startswith("not distilled") for w in warnings(_manifest(pipeline))) is warned


def test_fewer_elastic_students_than_asked_are_explained() -> None:
    short = {"requested": 3, "emitted": 1, "why": "the Pareto front holds 1 distinct subnets, 1 within the budgets"}
    lines = warnings(_manifest(["elastic.nest", "elastic.search{students=3}"], profile="cpu", shortfall=short))
    assert any("elastic search on cpu: 1 of the 3 students" in w and "Pareto front holds 1" in w for w in lines)
    assert not any("elastic search" in w for w in warnings(_manifest(["elastic.nest"], profile="cpu")))


def test_search_shortfall_names_the_cause() -> None:
    from potstill.passes.elastic.pass_ import _shortfall
    from potstill.passes.elastic.search import Candidate, SearchResult

    def cand(i: int, violation: float = 0.0) -> Candidate:
        return Candidate((i,), None, 0.9, 1.0 + i, 1.0, violation)  # _shortfall reads no config

    front = [cand(0), cand(1, violation=0.5)]
    over = [{"why": "latency 3.000 ms > 2 ms"}]
    one = SearchResult(front, [front[0]], over, 10, 1.0, "model")
    short = _shortfall(one, 3)
    assert short is not None and short["requested"] == 3 and short["emitted"] == 1
    assert "2 distinct subnets, 1 within the budgets" in short["why"] and "latency 3.000 ms > 2 ms" in short["why"]
    assert _shortfall(one, 1) is None
