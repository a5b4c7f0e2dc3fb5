"""``potstill compile --elastic``: planning, strict flags, and one real compile for two profiles from
one supernet."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from potstill.cli import main
from potstill.errors import InputError
from potstill.plan import CompileOptions, plan_students

HERE = Path(__file__).parent
TEACHER = f"{HERE / 'toy_teacher.py'}:teacher"
BASE = CompileOptions(teacher=TEACHER, out="out", profile="cpu", elastic=True)


def test_elastic_plans_one_per_profile_sharing_the_supernet() -> None:
    opts = replace(BASE, students=2, latency_ms=5.0, extra_profiles=("x86-avx512-ort",))
    plans = plan_students(opts, "onnxruntime", distill_epochs=2)
    assert [p.name for p in plans] == ["elastic-cpu", "elastic-x86-avx512-ort"]
    assert [p.profile for p in plans] == [None, "x86-avx512-ort"]
    for p in plans:
        names = [x.name for x in p.passes]
        assert names == ["elastic.nest", "elastic.train", "elastic.search", "lower.onnxruntime", "record"]
        assert "students=2" in p.spec and "latency_ms=5" in p.spec and "epochs=2" in p.spec


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"ratios": (0.5,)}, "--ratio with --elastic"),
    ({"drop_layers": 1}, "--drop-layers with --elastic"),
    ({"pipeline": "elastic.nest"}, "--pipeline with --elastic"),
    ({"students": 0}, "--students 0"),
    ({"latency_ms": -1.0}, "--latency-ms -1"),
    ({"elastic": False, "students": 2}, "--students without --elastic"),
    ({"elastic": False, "extra_profiles": ("cpu",)}, "second --profile without --elastic"),
    ({"extra_profiles": ("cpu",)}, "given twice"),
])
def test_elastic_flags_are_strict(changes: dict, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        plan_students(replace(BASE, **changes), "onnxruntime")


@pytest.mark.slow
def test_compile_elastic_for_two_profiles_from_one_supernet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["compile", TEACHER, "--elastic", "--students", "1", "--profile", "cpu",
                 "--profile", "x86-avx512-ort", "--distill-epochs", "1", "--json", "-q", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    students = manifest["students"]
    assert {s["plan"] for s in students} == {"elastic-cpu", "elastic-x86-avx512-ort"}
    for s in students:
        e = s["metrics"]["elastic"]
        assert e["front"] and 0 <= e["front_index"] < len(e["front"])
        assert e["measured_latency_ms"] > 0 and e["measured_memory_mb"] > 0
        assert s["parity"]["ok"]
    trained = [s for s in students if s["plan"] == "elastic-x86-avx512-ort"]
    assert trained and all(s["metrics"]["elastic"]["profile"] == "x86-avx512-ort" for s in trained)
