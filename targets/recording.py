"""The passes that record what a plan built: ``record`` and ``record.teacher``.

* ``record`` writes each student's ``student.pt2`` (and its reload record, and ``hf/`` for HF
  teachers: ``potstill.outputs.students_io``), runs the user's metric, measures fidelity to the
  teacher on the held-out batches (``potstill.fidelity``), and checks the profile's budgets by
  measurement: latency (the engine's median, or PyTorch's where the engine was not timed here,
  marked as such) and memory (weights + the cost model's peak activation bytes of the student). A
  miss is recorded under ``metrics["budgets"]`` and as a note; the driver prints it and the table
  marks it.
* ``record.teacher`` lowers the teacher the same way as the students (``lowering.lower_module``,
  into the work area) so speed-ups compare engines, and records its cost, metric and latency in
  ``state.shared.record``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError
from potstill.pipeline import Fact, Pass, PassResult, register_pass
from potstill.profiles import DeviceProfile
from potstill.state import CompileState, Student
from torch import nn

from .lowering import lower_module, state_profile, student_dir
from .registry import check_target
from .speedup import interleaved_speedup
from .timing import timing_method

# ---------------------------------------------------------------------------------------------
# Recording


def latency_record(art: Any, module: nn.Module, state: CompileState) -> dict[str, Any] | None:
    """``{"median", "p90", "source"}``: the engine's timing, else PyTorch's (``source: "pytorch"``)."""
    lat = getattr(art, "latency_ms", None) or {}
    if lat.get("median") is not None:
        return {"median": float(lat["median"]), "p90": float(lat.get("p90", lat["median"])), "source": "engine"}
    from .timing import measure_torch_latency

    torch_lat = measure_torch_latency(module, state.example_inputs, state.example_kwargs)
    return {"median": float(torch_lat["median"]), "p90": float(torch_lat["p90"]), "source": "pytorch"}


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def check_budgets(profile: DeviceProfile, latency: dict[str, Any] | None, memory_bytes: int) -> dict[str, Any]:
    """The profile's latency and memory budgets against what was measured; each with ``ok``."""
    out: dict[str, Any] = {}
    budget_ms = getattr(profile, "latency_budget_ms", None)
    if budget_ms is not None:
        measured = None if latency is None else latency["median"]
        out["latency_ms"] = {"budget": float(budget_ms), "measured": measured,
                             "source": None if latency is None else latency["source"],
                             "ok": measured is not None and measured <= budget_ms}  # fmt: skip
    budget_mb = getattr(profile, "memory_budget_mb", None)
    if budget_mb is not None:
        mb = memory_bytes / 2**20
        out["memory_mb"] = {"budget": float(budget_mb), "measured": mb, "ok": mb <= budget_mb}
    return out


def run_metric(metric: Any, module: nn.Module, who: str) -> float:
    """The user's ``metric(model)`` as a float; raising or returning a non-number is an InputError."""
    try:
        value = metric(module)
    except Exception as e:
        raise InputError(f"metric() raised on the {who}: {type(e).__name__}: {e}; fix metric(model) in the teacher file") from e
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"metric() returned {type(value).__name__} {value!r} on the {who}; it must return a number (higher is better)")
    return float(value)


def _engine_files(folder: Path, art: Any) -> dict[str, str]:
    """Engine files relative to the student folder (copied in when the target wrote elsewhere)."""
    files: dict[str, str] = {}
    for key, value in (getattr(art, "files", None) or {}).items():
        src = Path(value)
        if not src.exists():
            continue
        try:
            rel = src.resolve().relative_to(folder.resolve())
        except ValueError:
            dst = folder / src.name
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copy2(src, dst)
            rel = Path(src.name)
        files[str(key)] = str(rel)
    return files


def last_artifact(student: Student) -> Any:
    arts = [a for k, a in student.artifacts.items() if k != "record"]
    return arts[-1] if arts else None


def _recorded(state: CompileState) -> bool:
    """every student has a record"""
    return all("record" in s.artifacts for s in state.students)


@register_pass
class RecordPass(Pass):
    """Write each student's program (and hf/), run the metric, measure fidelity and the budgets."""

    in_place = False  # reads weights only

    name = "record"
    requires = (Fact("lowered"),)
    ensures = (_recorded,)

    def run(self, state: CompileState) -> PassResult:
        from potstill.fidelity import fidelity_floor, student_fidelity
        from potstill.outputs.students_io import save_program

        profile = state_profile(state)
        for student in state.students:
            folder = student_dir(state, student)
            folder.mkdir(parents=True, exist_ok=True)
            art = last_artifact(student)
            notes: list[str] = list(getattr(art, "notes", []) or [])
            files = _engine_files(folder, art) if art is not None else {}
            pt2 = save_program(student.module, state.example_inputs, state.example_kwargs, folder / "student.pt2",
                               fixed_batch=getattr(profile, "batch", None))  # fmt: skip
            if pt2["file"]:
                files["pt2"] = pt2["file"]
            if pt2["note"]:
                notes.append(f"student.pt2: {pt2['note']}")
            loaders, reload_notes = _save_reload_record(state, student.module, folder, files)
            notes += reload_notes
            if state.metric is not None:
                student.metrics["metric"] = run_metric(state.metric, student.module, f"student '{student.name}'")
            fid = student_fidelity(state, student)  # into student.metrics["fidelity"]
            if fid is not None and getattr(art, "precision", None) == "int8" and "onnx" in getattr(art, "files", {}):
                fid = _engine_fidelity(state, student, art, profile)
                notes.append(f"fidelity is the INT8 engine's ({fid.summary()}); the FP32 student's: "
                             f"{student.metrics['fidelity_fp32']['score']:.3f}")  # fmt: skip
            floor = fidelity_floor(profile)
            if fid is not None and not fid.ok(floor):
                what = "NaN: outputs not finite" if not fid.finite else f"{fid.score:.3f} below the floor {floor:g}"
                notes.append(f"FIDELITY {what} on held-out data ({fid.summary()})")
            latency = latency_record(art, student.module, state)
            if latency is not None and latency["source"] == "pytorch":
                notes.append("latency is PyTorch's: the engine was not timed on this machine")
            speedup, why = interleaved_speedup(state.shared.engine, state.teacher, art, student.module,
                                               tuple(state.example_inputs), state.example_kwargs, profile)
            if why:
                notes.append(why)
            memory = weight_bytes(student.module) + int(state.analysis(student).cost.peak_activation_bytes)
            budgets = check_budgets(profile, latency, memory)
            for key, b in budgets.items():
                if not b["ok"]:
                    notes.append(f"OVER BUDGET: {key.split('_')[0]} {b['measured'] if b['measured'] is None else round(b['measured'], 3)} "
                                 f"> {b['budget']:g} {key.split('_')[1]} (profile {profile.name})")  # fmt: skip
            asked = (student.metrics.get("prune") or {}).get("budget") or {}
            if asked.get("met") is False:  # --ratio that width pruning could not reach
                notes.append(f"OVER BUDGET: {asked.get('note') or asked.get('asked')}")
            student.metrics["budgets"] = budgets
            student.artifacts["record"] = {
                "files": files, "notes": notes, "dynamic_batch": pt2["dynamic_batch"], "latency_ms": latency,
                "speedup_timing": speedup.to_dict() if speedup is not None else None,
                "memory_bytes": memory, "target": getattr(art, "target", None), "precision": getattr(art, "precision", None),
                "loaders": loaders,
            }  # fmt: skip
        state.facts.add("recorded")
        return PassResult(state, False)


def _engine_fidelity(state: CompileState, student: Student, art: Any, profile: DeviceProfile) -> Any:
    """Fidelity measured on the INT8 engine itself (what ships), the FP32 student's kept as
    ``fidelity_fp32``: quantisation error is part of what the student lost."""
    from potstill.fidelity import measure_fidelity

    from .onnxruntime import engine_module, fixed_batch

    example = fixed_batch(state.example_inputs, state.example_kwargs, profile.batch)
    engine = engine_module(student.module, art.files["onnx"], example, profile)
    fid = measure_fidelity(state.teacher, engine, state.heldout_data, state.records.get("_fidelity_task"))
    student.metrics["fidelity_fp32"] = student.metrics["fidelity"]
    student.metrics["fidelity"] = fid.to_dict()
    return fid


def _save_reload_record(state: CompileState, module: nn.Module, folder: Path, files: dict[str, str]) -> tuple[list[str], list[str]]:
    """Write ``model.safetensors`` + ``architecture.json`` (and ``hf/`` where a config states the
    shapes); returns the loaders that were checked to rebuild this student, and notes."""
    from potstill.outputs.students_io import RECORD_FILE, WEIGHTS_FILE, save_student

    if not state.teacher_spec:
        return [], ["no reload record: the teacher was given as a module, not as hf:PATH or file.py:FACTORY; "
                    "use student.pt2 or the engine"]  # fmt: skip
    try:
        rec = save_student(module, folder, teacher={"spec": state.teacher_spec, "hf": state.hf},
                           example=(state.example_inputs, state.example_kwargs))  # fmt: skip
    except InputError as e:
        return [], [f"no reload record: {e}"]
    files["weights"], files["record"] = WEIGHTS_FILE, RECORD_FILE
    if (folder / "hf").is_dir():
        files["hf"] = "hf"
    return list(rec["loaders"]), list(rec["notes"])


@dataclass(frozen=True)
class TeacherOptions:
    #: the target the students are lowered to
    target: str = "onnxruntime"
    #: lower and time the teacher (False: cost and metric only, no latency, so no speed-ups)
    timing: bool = True

    def __post_init__(self) -> None:
        check_target(self.target)


def _teacher_recorded(state: CompileState) -> bool:
    """the teacher's record is in state.shared.record"""
    return bool(state.shared.record)


@register_pass
class TeacherRecordPass(Pass):
    """Lower the teacher like the students (into the work area) and record its cost, metric and latency."""

    in_place = False  # reads the teacher only

    name = "record.teacher"
    Options = TeacherOptions
    ensures = (_teacher_recorded,)

    def run(self, state: CompileState) -> PassResult:
        from potstill.outputs.manifest import architecture, cost, parity_dict

        analysis = state.teacher_analysis()
        scratch = Path(state.work_dir or tempfile.mkdtemp(prefix="potstill-teacher-")) / "teacher-engine"
        if scratch.exists():
            shutil.rmtree(scratch)
        art = None
        if self.options.timing:
            # the reference is the teacher as the user has it: an INT8 profile's students are timed
            # against the FP32 teacher engine, so their speed-ups include what INT8 buys
            art = lower_module(state, state.teacher, scratch, self.options.target, state_profile(state).unquantised(),
                               name="teacher")  # fmt: skip
        state.shared.engine = art  # the students' engines are timed interleaved with it (record)
        if state.metric is not None and state.shared.metric is None:
            state.shared.metric = run_metric(state.metric, state.teacher, "teacher")
        state.shared.record = {
            **cost(analysis), "metric": state.shared.metric, "architecture": architecture(analysis),
            "hf": state.hf, "latency_ms": latency_record(art, state.teacher, state) if art else None,
            "parity": parity_dict(art.parity) if art else None, "target": self.options.target,
            "precision": art.precision if art else None,
            "latency_method": timing_method(state.example_inputs, state.example_kwargs) if art else None,
        }  # fmt: skip
        return PassResult(state, False)
