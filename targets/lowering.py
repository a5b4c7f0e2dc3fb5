"""The lowering passes: ``lower.<target>`` for every registered target, and ``quantize.int8``.

Every student is lowered through one preamble, ``lower_student``: the student's folder, a saved HF
directory for Optimum when the teacher is an HF model, the profile (with the pass's changes), then
``lower()``. Parity and latency go to the student's metrics. ``lower.<target>`` is built on first
use for any target of the registry (``targets.registry``; the pipeline's ``PASS_FAMILIES`` asks
``family_pass``), so a plugin target gets its pass with nothing more. ``quantize.int8`` is
``lower.onnxruntime`` with the profile's precision set to INT8.

These passes sit above the backends, so no backend imports a pass and the dependency runs one
way: pipeline → passes → targets.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.errors import PreconditionError
from potstill.pipeline import Fact, Pass, PassResult, register_pass
from potstill.profiles import DeviceProfile, load_profile
from potstill.state import CompileState, Student
from torch import nn

from .artifact import Artifact
from .lower import lower
from .registry import get_target, target_names

# ---------------------------------------------------------------------------------------------
# The one lowering preamble


def state_profile(state: CompileState, changes: dict[str, Any] | None = None) -> DeviceProfile:
    """The state's profile with ``changes`` applied (nested settings merged)."""
    profile = load_profile(state.profile) if state.profile is not None else load_profile()
    for key, value in (changes or {}).items():
        if isinstance(value, dict):
            value = getattr(profile, key).model_copy(update=value)
        profile = profile.model_copy(update={key: value})
    return profile


def student_dir(state: CompileState, student: Student) -> Path:
    if state.out_dir is None:
        raise PreconditionError("lowering and recording need state.out_dir (where the students' files go)")
    return Path(state.out_dir) / "students" / student.name


def lower_module(
    state: CompileState, module: nn.Module, out: Path, target: str, profile: DeviceProfile, *, name: str = ""
) -> Artifact:
    """``lower()`` with the state's inputs, data and HF details: the one preamble of every lowering."""
    hf, tmp = None, None
    if state.hf:
        saved = out / "hf"
        if module is state.teacher and state.hf.get("path"):  # saved already: no second copy to write and read
            hf = {"dir": state.hf["path"], "task": state.hf.get("task")}
        elif (saved / "config.json").is_file():
            hf = {"dir": str(saved), "task": state.hf.get("task")}
        elif hasattr(module, "save_pretrained"):
            tmp = Path(tempfile.mkdtemp(prefix=f"potstill-hf-{name}-"))
            module.save_pretrained(str(tmp))  # type: ignore[operator]
            hf = {"dir": str(tmp), "task": state.hf.get("task")}
    subdir = get_target(target).subdir
    try:
        return lower(module, state.example_inputs, profile, out / subdir if subdir else out,
                     target=target, example_kwargs=state.example_kwargs, dynamic_batch=state.dynamic_batch,
                     calib=state.calib_data, hf=hf)  # fmt: skip
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def lower_student(state: CompileState, student: Student, target: str, profile: DeviceProfile) -> Artifact:
    art = lower_module(state, student.module, student_dir(state, student), target, profile, name=student.name)
    student.artifacts[target] = art
    student.metrics["parity"] = dict(art.parity)
    student.metrics["latency_ms"] = dict(art.latency_ms)
    student.metrics.setdefault("targets", {})[target] = {
        "precision": art.precision, "parity": dict(art.parity), "latency_ms": dict(art.latency_ms),
    }  # fmt: skip
    return art


@dataclass(frozen=True)
class NoLowerOptions:
    """Lowering passes take their settings from the profile."""


class LowerPass(Pass):
    """Lower every student of the state to ``target`` (see the module docstring)."""

    in_place = False  # reads weights only

    target = ""
    Options: type = NoLowerOptions
    ensures: tuple[Any, ...] = (Fact("lowered"),)

    def profile_changes(self) -> dict[str, Any]:
        return {}

    def run(self, state: CompileState) -> PassResult:
        profile = state_profile(state, self.profile_changes())
        for student in state.students or [state.working()]:
            lower_student(state, student, self.target, profile)
        state.facts.add("lowered")
        # engines and records were added; the students' modules (the IR) are unchanged
        return PassResult(state, False)


def family_pass(target: str) -> type[LowerPass]:
    """The pass ``lower.<target>``, built and registered on first use for any registered target
    (the pipeline's ``PASS_FAMILIES``); an unknown target is an InputError listing them."""
    spec = get_target(target)
    cls = type(f"Lower{target.title().replace('_', '')}Pass", (LowerPass,), {
        "name": f"lower.{target}", "target": target, "__module__": __name__,
        "__doc__": f"Lower every student to the target '{target}': {spec.summary}",
    })  # fmt: skip
    return register_pass(cls)  # type: ignore[return-value]


def family_names() -> list[str]:
    """The ``lower.<target>`` passes, one per target."""
    return [f"lower.{t}" for t in target_names()]


@dataclass(frozen=True)
class Int8Options:
    #: calibration samples for NNCF; None: the profile's ``int8.calibration_samples``
    calibration_samples: int | None = None

    def __post_init__(self) -> None:
        if self.calibration_samples is not None and self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")


@register_pass
class QuantizeInt8Pass(LowerPass):
    """Lower every student to ONNX Runtime INT8 (NNCF), keeping FP32 where INT8 does not pay."""

    name = "quantize.int8"
    target = "onnxruntime"
    Options = Int8Options
    ensures = (Fact("quantized"), Fact("lowered"))

    def profile_changes(self) -> dict[str, Any]:
        changes: dict[str, Any] = {"precision": "int8"}
        if self.options.calibration_samples is not None:
            changes["int8"] = {"calibration_samples": self.options.calibration_samples}
        return changes

    def run(self, state: CompileState) -> PassResult:
        result = super().run(state)
        state.facts.add("quantized")
        return result


def is_lowering(p: Pass) -> bool:
    return isinstance(p, LowerPass)
