"""Pass infrastructure: pipeline strings, the lazy registry, function passes, the manager, instruments."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from potstill.errors import InputError, PassError, PostconditionError, PreconditionError
from potstill.pipeline import (
    DumpIRInstrument,
    Pass,
    PassManager,
    PassResult,
    SkipInstrument,
    TimingInstrument,
    VerifyInstrument,
    build_pipeline,
    function_pass,
    get_pass,
    parse_pipeline,
    register_pass,
)
from potstill.state import CompileState
from torch import nn


def make_state() -> CompileState:
    torch.manual_seed(0)
    return CompileState(teacher=nn.Linear(4, 3).eval(), example_inputs=(torch.randn(2, 4),))


@dataclass(frozen=True)
class ScaleOptions:
    factor: float = 1.0
    layers: tuple = ()
    exact: bool = False
    name: str = "x"


def register_scale() -> type[Pass]:
    @function_pass("test.scale", options=ScaleOptions, ensures={"scaled"})
    def scale(state: CompileState, opts: ScaleOptions) -> bool:
        """Multiply the working student's weight by ``factor``."""
        student = state.working()
        with torch.no_grad():
            student.module.weight.mul_(opts.factor)
        state.facts.add("scaled")
        return opts.factor != 1.0

    return scale


# ---------------------------------------------------------------------------------------------
# Pipeline strings


def test_parse_plain_names() -> None:
    assert parse_pipeline("a,b.c, d") == [("a", {}), ("b.c", {}), ("d", {})]


def test_parse_options_are_yaml_scalars() -> None:
    steps = parse_pipeline("prune.width{ratio=0.5,steps=2,uniform=true,kinds=[heads,neurons]},lower.onnx")
    assert steps == [
        ("prune.width", {"ratio": 0.5, "steps": 2, "uniform": True, "kinds": ["heads", "neurons"]}),
        ("lower.onnx", {}),
    ]


def test_parse_nested_braces_and_lists_keep_commas_inside() -> None:
    steps = parse_pipeline("distill{stages=[{loss: kd, epochs: 1},{loss: ce}],w=[1,2]},x")
    assert steps[0] == ("distill", {"stages": [{"loss": "kd", "epochs": 1}, {"loss": "ce"}], "w": [1, 2]})
    assert steps[1] == ("x", {})


def test_parse_empty_pipeline_is_empty() -> None:
    assert parse_pipeline("  ") == []


@pytest.mark.parametrize("text", [",,,", " , ", "a,,b", "a,", ",a", "a{k=1,,j=2}"])
def test_empty_items_are_errors(text: str) -> None:
    with pytest.raises(InputError, match="empty item"):
        parse_pipeline(text)


def test_an_option_given_twice_is_an_error() -> None:
    with pytest.raises(InputError, match="option 'ratio' is given twice"):
        parse_pipeline("prune.width{ratio=0.3,ratio=0.5}")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a{ratio=0.5", "unbalanced"),
        ("a}ratio=0.5{", "unbalanced"),
        ("a{ratio=0.5}b", "must end with"),
        ("a{ratio}", "not key=value"),
    ],
)
def test_parse_errors_name_the_step(text: str, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        parse_pipeline(text)


def test_unknown_pass_lists_the_known_ones() -> None:
    with pytest.raises(InputError, match=r"unknown pass 'prune\.nothing'") as e:
        build_pipeline("prune.nothing")
    assert "prune.width" in str(e.value)


def test_options_are_coerced_and_checked(registry: dict[str, type[Pass]]) -> None:
    register_scale()
    (p,) = build_pipeline("test.scale{factor=2,layers=[1,2],exact=yes}")
    assert p.options == ScaleOptions(factor=2.0, layers=(1, 2), exact=True)
    assert isinstance(p.options.factor, float)
    with pytest.raises(InputError, match="unknown option"):
        build_pipeline("test.scale{facter=2}")
    with pytest.raises(InputError, match="option 'factor' must be float"):
        build_pipeline("test.scale{factor=abc}")
    with pytest.raises(InputError, match="option 'exact' must be bool"):
        build_pipeline("test.scale{exact=maybe}")


def test_options_are_frozen(registry: dict[str, type[Pass]]) -> None:
    register_scale()
    (p,) = build_pipeline("test.scale{factor=2}")
    with pytest.raises(AttributeError):
        p.options.factor = 3.0


def test_spec_round_trips(registry: dict[str, type[Pass]]) -> None:
    register_scale()
    text = "test.scale{factor=0.5,layers=[1,2]},test.scale"
    passes = build_pipeline(text)
    assert [p.spec() for p in passes] == ["test.scale{factor=0.5,layers=[1,2]}", "test.scale"]
    again = build_pipeline(",".join(p.spec() for p in passes))
    assert [p.options for p in again] == [p.options for p in passes]


def test_build_pipeline_accepts_pass_objects_and_lists(registry: dict[str, type[Pass]]) -> None:
    cls = register_scale()
    obj = cls(factor=3.0)
    passes = build_pipeline(["test.scale{factor=2}", obj])
    assert passes[1] is obj and passes[0].options.factor == 2.0


# ---------------------------------------------------------------------------------------------
# Registry


def test_builtin_passes_are_imported_on_first_use() -> None:
    code = (
        "import sys\n"
        "from potstill.pipeline import get_pass\n"
        "mod = 'potstill.passes.importance.magnitude'\n"
        "before = mod in sys.modules\n"
        "cls = get_pass('importance.magnitude')\n"
        "print(before, mod in sys.modules, cls.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["False", "True", "importance.magnitude"]


def test_help_imports_no_heavy_optional_dependency() -> None:
    code = (
        "import sys\n"
        "from potstill.cli import main\n"
        "for argv in (['--help'], ['compile', '--help'], ['inspect', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "heavy = ('nncf', 'tensorrt', 'transformers', 'optimum', 'torch')\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    last = out.stdout.strip().splitlines()[-1]
    assert last == "LOADED []", last


def test_console_script_help_runs() -> None:
    exe = Path(sys.executable).with_name("potstill")
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "potstill.cli", "--help"]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0
    for command in ("compile", "inspect", "profile", "profiles"):
        assert command in out.stdout


def test_register_pass_needs_a_name_and_dataclass_options(registry: dict[str, type[Pass]]) -> None:
    class Nameless(Pass):
        pass

    with pytest.raises(TypeError, match="no name"):
        register_pass(Nameless)

    class BadOptions(Pass):
        name = "test.bad"
        Options = dict

    with pytest.raises(TypeError, match="frozen dataclass"):
        register_pass(BadOptions)


def test_a_taken_pass_name_is_refused(registry: dict[str, type[Pass]]) -> None:
    register_scale()

    class Other(Pass):
        name = "test.scale"

    with pytest.raises(InputError, match=r"'test\.scale' is taken"):
        register_pass(Other)

    class Shadow(Pass):
        name = "prune.width"  # a built-in, even before its module is imported

    with pytest.raises(InputError, match="built-in pass"):
        register_pass(Shadow)


def test_option_types_come_from_annotations(registry: dict[str, type[Pass]]) -> None:
    @dataclass(frozen=True)
    class Typed:
        steps: int | None = None
        mode: Literal["a", "b"] = "a"
        sizes: tuple[int, ...] = ()

    register_pass(type("T", (Pass,), {"name": "test.typed", "Options": Typed}))
    (p,) = build_pipeline("test.typed{steps=3,mode=b,sizes=[1,2]}")
    assert p.options == Typed(steps=3, mode="b", sizes=(1, 2))
    with pytest.raises(InputError, match="option 'steps' must be"):
        build_pipeline("test.typed{steps=1.5}")
    with pytest.raises(InputError, match="option 'mode' must be"):
        build_pipeline("test.typed{mode=c}")
    with pytest.raises(InputError, match="option 'sizes' must be"):
        build_pipeline("test.typed{sizes=[x]}")


def test_predicates_are_callables_on_the_state(registry: dict[str, type[Pass]]) -> None:
    def has_students(state: CompileState) -> bool:
        """at least one student"""
        return bool(state.students)

    @function_pass("test.needs_student", requires=[has_students])
    def needs(state: CompileState, opts: object) -> bool:
        return False

    with pytest.raises(PassError, match="has_students"):
        PassManager(build_pipeline("test.needs_student")).run(make_state())
    state = make_state()
    state.working()
    assert PassManager(build_pipeline("test.needs_student")).run(state).state.pipeline == ["test.needs_student"]


def test_the_manager_writes_each_students_history(registry: dict[str, type[Pass]]) -> None:
    register_scale()
    state = make_state()
    state.working()
    PassManager(build_pipeline("test.scale{factor=2},test.scale")).run(state)
    assert state.students[0].history == ["test.scale{factor=2.0}", "test.scale"]


# ---------------------------------------------------------------------------------------------
# function_pass and the manager


def test_function_pass_registers_and_runs(registry: dict[str, type[Pass]]) -> None:
    cls = register_scale()
    assert get_pass("test.scale") is cls
    assert cls.__doc__ and "Multiply" in cls.__doc__
    state = make_state()
    before = state.teacher.weight.detach().clone()
    result = PassManager(build_pipeline("test.scale{factor=2}")).run(state)
    assert result.changed
    student = result.state.working()
    torch.testing.assert_close(student.module.weight, 2 * before)
    torch.testing.assert_close(state.teacher.weight, before)  # the teacher is never edited
    assert result.state.pipeline == ["test.scale{factor=2.0}"]
    assert "scaled" in result.state.facts


def test_unchanged_pass_reports_no_change(registry: dict[str, type[Pass]]) -> None:
    register_scale()
    result = PassManager(build_pipeline("test.scale{factor=1}")).run(make_state())
    assert not result.changed


def _register_chain() -> None:
    @function_pass("test.a")
    def a(state: CompileState, opts: object) -> bool:
        return False

    @function_pass("test.b")
    def b(state: CompileState, opts: object) -> bool:
        return False

    @function_pass("test.fail")
    def fail(state: CompileState, opts: object) -> bool:
        raise ValueError("boom in the pass")


def test_failure_names_the_pass_and_those_before_it(registry: dict[str, type[Pass]]) -> None:
    _register_chain()
    with pytest.raises(PassError) as e:
        PassManager(build_pipeline("test.a,test.b,test.fail,test.a")).run(make_state())
    msg = str(e.value)
    assert "pass 'test.fail' failed" in msg
    assert "passes before it: test.a, test.b" in msg
    assert "boom in the pass" in msg
    assert isinstance(e.value.__cause__, ValueError)


def test_failure_of_the_first_pass_says_none_ran_before(registry: dict[str, type[Pass]]) -> None:
    _register_chain()
    with pytest.raises(PassError, match=r"passes before it: none"):
        PassManager(build_pipeline("test.fail")).run(make_state())


def test_requires_is_checked(registry: dict[str, type[Pass]]) -> None:
    @function_pass("test.needs", requires={"importance"})
    def needs(state: CompileState, opts: object) -> bool:
        return True

    with pytest.raises(PassError) as e:
        PassManager(build_pipeline("test.needs")).run(make_state())
    assert isinstance(e.value.__cause__, PreconditionError)
    assert "requires ['importance']" in str(e.value)


def test_ensures_is_checked(registry: dict[str, type[Pass]]) -> None:
    @function_pass("test.liar", ensures={"pruned"})
    def liar(state: CompileState, opts: object) -> bool:
        return True

    with pytest.raises(PassError) as e:
        PassManager(build_pipeline("test.liar")).run(make_state())
    assert isinstance(e.value.__cause__, PostconditionError)


def test_run_must_return_a_pass_result(registry: dict[str, type[Pass]]) -> None:
    @register_pass
    class Sloppy(Pass):
        name = "test.sloppy"

        def run(self, state: CompileState) -> PassResult:
            return True  # type: ignore[return-value]

    with pytest.raises(PassError) as e:
        PassManager([Sloppy()]).run(make_state())
    assert isinstance(e.value.__cause__, PostconditionError)


def test_a_manager_nests_as_a_pass_with_its_passes_contract_combined(registry: dict[str, type[Pass]]) -> None:
    register_scale()  # ensures "scaled"
    _register_chain()

    @function_pass("test.needs_scaled", requires={"scaled"}, ensures={"checked"})
    def needs_scaled(state: CompileState, opts: object) -> bool:
        state.facts.add("checked")
        return False

    inner = PassManager(build_pipeline("test.scale{factor=2},test.needs_scaled"))
    assert isinstance(inner, Pass)
    assert inner.spec() == "test.scale{factor=2.0},test.needs_scaled"
    assert [str(r) for r in inner.requires] == []  # "scaled" is ensured inside before it is required
    assert sorted(str(e) for e in inner.ensures) == ["checked", "scaled"]
    assert inner.in_place

    state = make_state()
    before = state.teacher.weight.detach().clone()
    timing = TimingInstrument()
    result = PassManager([*build_pipeline("test.a"), inner, *build_pipeline("test.scale{factor=3}")], [timing]).run(state)
    assert result.changed
    torch.testing.assert_close(result.state.working().module.weight, 6 * before)
    # the nested passes are recorded once each, in order, by the manager that ran them
    assert result.state.pipeline == ["test.a", "test.scale{factor=2.0}", "test.needs_scaled", "test.scale{factor=3.0}"]
    assert result.state.students[0].history == result.state.pipeline[1:]  # the student appeared at test.scale
    # the outer manager's instruments see the nested manager as one step
    assert [name for name, _, _ in timing.times] == ["test.a", "test.scale{factor=2.0},test.needs_scaled", "test.scale{factor=3.0}"]
    # the flattened spec rebuilds the same pipeline
    assert [p.spec() for p in build_pipeline(inner.spec())] == ["test.scale{factor=2.0}", "test.needs_scaled"]


def test_a_nested_managers_contract_is_checked_and_its_failure_named(registry: dict[str, type[Pass]]) -> None:
    _register_chain()

    @function_pass("test.needs_scaled", requires={"scaled"})
    def needs_scaled(state: CompileState, opts: object) -> bool:
        return False

    inner = PassManager(build_pipeline("test.a,test.needs_scaled"))
    assert [str(r) for r in inner.requires] == ["scaled"]
    with pytest.raises(PassError) as e:
        PassManager([*build_pipeline("test.b"), inner]).run(make_state())
    assert "pass 'test.a,test.needs_scaled' failed (passes before it: test.b)" in str(e.value)
    assert isinstance(e.value.__cause__, PreconditionError)  # checked before any inner pass ran
    with pytest.raises(PassError) as e:
        PassManager([PassManager(build_pipeline("test.a,test.fail"))]).run(make_state())
    assert "pass 'test.fail' failed (passes before it: test.a)" in str(e.value)
    assert isinstance(e.value.__cause__, PassError) and isinstance(e.value.__cause__.__cause__, ValueError)


# ---------------------------------------------------------------------------------------------
# Instruments


def test_timing_instrument_records_every_pass(registry: dict[str, type[Pass]]) -> None:
    register_scale()
    _register_chain()
    timing = TimingInstrument()
    PassManager(build_pipeline("test.a,test.scale{factor=3}"), [timing]).run(make_state())
    assert [(name, changed) for name, _, changed in timing.times] == [("test.a", False), ("test.scale{factor=3.0}", True)]
    assert all(sec >= 0 for _, sec, _ in timing.times)
    assert timing.table().row_count == 2


def test_skip_instrument_skips_by_name(registry: dict[str, type[Pass]]) -> None:
    register_scale()
    _register_chain()
    result = PassManager(build_pipeline("test.fail,test.scale{factor=2}"), [SkipInstrument(frozenset({"test.fail"}))]).run(
        make_state()
    )
    assert result.state.pipeline == ["test.scale{factor=2.0}"]


def test_dump_and_verify_run_around_changing_passes(tmp_path: Path) -> None:
    """A real pipeline (magnitude importance, then a 50 % width prune) dumps the real IR: the hidden
    width in each dump is the one the module has at that point, read from the module itself."""
    from potstill.ir.verify import verify_student

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    state = CompileState(teacher=teacher, example_inputs=(torch.randn(2, 4),))
    verified: list[int] = []

    def check(s: CompileState) -> None:  # the real verifier, and the hidden width it saw
        verify_student(s)
        verified.append(s.working().module[0].out_features)

    passes = build_pipeline("importance.magnitude,prune.width{ratio=0.5}")
    result = PassManager(passes, [DumpIRInstrument(directory=tmp_path), VerifyInstrument(check=check)]).run(state)
    names = sorted(p.name for p in tmp_path.iterdir())
    # before both passes; after only the one that changed the model (importance only scores it)
    assert names == ["01-before-importance.magnitude.txt", "02-after-prune.width.txt", "02-before-prune.width.txt"]
    assert verified == [16]  # once, after the prune
    student = result.state.working().module
    for dump, hidden in (("01-before-importance.magnitude.txt", teacher[0].out_features),
                         ("02-before-prune.width.txt", teacher[0].out_features),
                         ("02-after-prune.width.txt", student[0].out_features)):
        lines = (tmp_path / dump).read_text().splitlines()
        assert lines[:5] == [
            "%input: float32[2x4] = placeholder()",
            f"%linear: float32[2x{hidden}] = linear(%input, @0.weight, @0.bias)  # 0",
            f"%relu: float32[2x{hidden}] = relu(%linear)  # 1",
            "%linear_1: float32[2x3] = linear(%relu, @2.weight, @2.bias)  # 2",
            "%output: -[-] = output(%linear_1)",
        ], dump
        # the coupled group the prune acted on: the hidden neurons, shared by both linears
        assert f"g0 neurons x{hidden} [0, 2]  prunable" in lines, dump
    assert teacher[0].out_features == 32 and student[0].out_features == 16


def test_verify_instrument_raises_through_the_manager(registry: dict[str, type[Pass]], monkeypatch: pytest.MonkeyPatch) -> None:
    from potstill.errors import VerificationError

    register_scale()

    def broken(self: CompileState) -> None:
        raise VerificationError("dangling value %x")

    with pytest.raises(VerificationError, match="dangling"):
        PassManager(build_pipeline("test.scale{factor=2}"), [VerifyInstrument(check=broken)]).run(make_state())


def test_lower_passes_come_from_targets_only(registry: dict[str, type[Pass]]) -> None:
    class LowerMine(Pass):
        name = "lower.mine"

        def run(self, state: CompileState) -> PassResult:
            return PassResult(state, False)

    with pytest.raises(InputError, match="@target"):
        register_pass(LowerMine)
    from potstill.targets.lowering import LowerPass

    lower_onnx = get_pass("lower.onnx")  # built on first use for the registered target
    assert issubclass(lower_onnx, LowerPass) and lower_onnx.target == "onnx"
    with pytest.raises(InputError, match=r"unknown target 'onx' \(did you mean 'onnx'\?\)"):
        get_pass("lower.onx")
