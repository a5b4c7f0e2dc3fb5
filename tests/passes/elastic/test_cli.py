"""``potstill compile --elastic``: planning, strict flags, and one real compile for two profiles from
one supernet."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from potstill.errors import InputError
from potstill.pipeline import Pass, PassInstrument, PassResult
from potstill.plan import CompileOptions, plan_students
from potstill.state import CompileState

HERE = Path(__file__).parent
TEACHER = f"{HERE / 'toy_teacher.py'}:teacher"
BASE = CompileOptions(teacher=TEACHER, out="out", profile="cpu", elastic=True)


def test_elastic_plans_one_per_profile_sharing_the_supernet() -> None:
    opts = replace(BASE, students=2, speedups=(2.0,), extra_profiles=("x86-avx512-ort",), distill_epochs=2)
    plans = plan_students(opts, "onnxruntime", distill_epochs=2)
    assert [p.name for p in plans] == ["elastic-cpu", "elastic-x86-avx512-ort"]
    assert [p.profile for p in plans] == [None, "x86-avx512-ort"]
    for p in plans:
        names = [x.name for x in p.passes]
        assert names == ["elastic.nest", "elastic.train", "elastic.search", "lower.onnxruntime", "record"]
        assert "students=2" in p.spec and "speedup=[2.0]" in p.spec and "epochs=2" in p.spec
    # cpu aligns widths to 8 channels, x86-avx512-ort to 16: both nest with 16, so the second plan's
    # elastic.nest finds the first one's supernet under the same key instead of nesting its own
    nests = [next(x for x in p.passes if x.name == "elastic.nest") for p in plans]
    assert [n.options.channel_multiple for n in nests] == [16, 16] and nests[0].spec() == nests[1].spec()
    (alone,) = plan_students(replace(opts, extra_profiles=()), "onnxruntime", distill_epochs=2)
    assert next(x for x in alone.passes if x.name == "elastic.nest").options.channel_multiple is None


def test_elastic_training_defaults_to_its_step_budget() -> None:
    # the driver passes the default distillation epochs; without --distill-epochs the supernet trains
    # for elastic.train's own step budget (a supernet needs more steps than one student)
    (plan,) = plan_students(BASE, "onnxruntime", distill_epochs=3)
    train = next(p for p in plan.passes if p.name == "elastic.train")
    assert train.options.epochs is None and "epochs" not in plan.spec
    assert not [p for p in plan_students(BASE, "onnxruntime")[0].passes if p.name == "elastic.train"]


def test_no_augment_and_train_minutes_reach_the_supernet_training() -> None:
    from potstill.plan import check_flags

    opts = replace(BASE, augment=False)
    check_flags(opts)  # --no-augment and --train-minutes shape elastic.train
    (plan,) = plan_students(opts, "onnxruntime", distill_epochs=3)
    assert next(p for p in plan.passes if p.name == "elastic.train").options.augment is False
    assert "elastic.train{augment=False}" in plan.spec
    (plain,) = plan_students(BASE, "onnxruntime", distill_epochs=3)
    assert next(p for p in plain.passes if p.name == "elastic.train").options.augment is None
    check_flags(replace(BASE, train_minutes=5.0))
    (timed,) = plan_students(replace(BASE, train_minutes=5.0), "onnxruntime", distill_epochs=3)
    train = next(p for p in timed.passes if p.name == "elastic.train")
    assert train.options.minutes == 5.0 and train.options.epochs is None
    with pytest.raises(InputError, match="--train-minutes: no default distillation would use it"):
        check_flags(replace(BASE, train_minutes=5.0, distill=False))


def test_several_speedups_make_one_student_each() -> None:
    (plan,) = plan_students(replace(BASE, speedups=(1.5, 3.0)), "onnxruntime")
    search = next(p for p in plan.passes if p.name == "elastic.search")
    assert search.options.speedup == (1.5, 3.0) and search.options.wanted == 2


def _table_profile(tmp_path: Path) -> str:
    """The cpu profile with a (made-up) measured latency table, as a YAML file."""
    import yaml
    from potstill.profiles import LatencyEntry, LatencyTable, load_profile

    table = LatencyTable(entries=[LatencyEntry(op="conv2d", cin=16, cout=16, kernel=3, hw=8, groups=1, stride=1, ms=0.01)])
    profile = load_profile("cpu").model_copy(update={"name": "cpu-table", "latency_table": table})
    path = tmp_path / "cpu-table.yaml"
    path.write_text(yaml.safe_dump(profile.model_dump(mode="json")))
    return str(path)


def test_absolute_latency_needs_a_measured_table(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"measured latency table.*--speedup S.*potstill profile"):
        plan_students(replace(BASE, latency_ms=5.0), "onnxruntime")
    (plan,) = plan_students(replace(BASE, latency_ms=5.0, profile=_table_profile(tmp_path)), "onnxruntime")
    assert "latency_ms=5" in plan.spec


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"ratios": (0.5,)}, "--ratio with --elastic"),
    ({"drop_layers": 1}, "--drop-layers with --elastic"),
    ({"pipeline": "elastic.nest"}, "--pipeline with --elastic"),
    ({"students": 0}, "--students 0"),
    ({"latency_ms": -1.0}, "--latency-ms -1"),
    ({"speedups": (0.5,)}, "--speedup 0.5: a budget is how many times faster"),
    ({"speedups": (2.0, 2.0)}, "given twice"),
    ({"speedups": (2.0,), "latency_ms": 5.0}, "--speedup with --latency-ms"),
    ({"speedups": (2.0, 3.0, 4.0), "students": 2}, "--students 2 with 3 --speedup"),
    ({"elastic": False, "speedups": (2.0,)}, "--speedup without --elastic"),
    ({"elastic": False, "students": 2}, "--students without --elastic"),
    ({"elastic": False, "extra_profiles": ("cpu",)}, "second --profile without --elastic"),
    ({"extra_profiles": ("cpu",)}, "given twice"),
])
def test_elastic_flags_are_strict(changes: dict, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        plan_students(replace(BASE, **changes), "onnxruntime")


class _ElasticWatch(PassInstrument):
    """Records, after each elastic pass, the profile it ran for, whether it changed anything, and the
    supernet object it acted on (held, not its id: an id can be reused once an object is freed)."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str, bool, object]] = []

    def after_pass(self, p: Pass, state: CompileState, result: PassResult) -> None:
        if p.name.startswith("elastic."):
            from potstill.passes.elastic.pass_ import supernet_of

            profile = getattr(state.profile, "name", state.profile)
            self.runs.append((p.name, str(profile), result.changed, supernet_of(result.state)))


@pytest.mark.slow
def test_compile_elastic_for_two_profiles_from_one_supernet(tmp_path: Path) -> None:
    from potstill.driver import compile_teacher

    out = tmp_path / "out"
    watch = _ElasticWatch()
    opts = replace(BASE, out=str(out), students=1, extra_profiles=("x86-avx512-ort",), distill_epochs=1,
                   progress=False)
    compile_teacher(opts, note=lambda line: None, instruments=[watch])
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
    # one supernet shared: both plans' nest, train and search acted on the same object, nested and
    # trained by the first plan only; the second plan searched it for its own device
    assert [(name, profile, changed) for name, profile, changed, _ in watch.runs] == [
        ("elastic.nest", "cpu", True), ("elastic.train", "cpu", True), ("elastic.search", "cpu", True),
        ("elastic.nest", "x86-avx512-ort", True), ("elastic.train", "x86-avx512-ort", False),
        ("elastic.search", "x86-avx512-ort", True),
    ]
    nets = [net for *_, net in watch.runs]
    assert all(net is nets[0] for net in nets)
    assert len(nets[0].trained) == 1  # one training run, recorded once


def test_speedup_is_repeatable_or_a_list() -> None:
    from potstill.cli import build_parser

    args = build_parser().parse_args(["compile", TEACHER, "--elastic", "--speedup", "2", "--speedup", "1.5,3"])
    assert [s for group in args.speedup for s in group] == [2.0, 1.5, 3.0]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compile", TEACHER, "--elastic", "--speedup", "fast"])
