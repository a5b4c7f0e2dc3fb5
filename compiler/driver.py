"""One compilation, start to finish: what ``potstill compile`` runs, callable from Python too.

    from potstill.driver import CompileOptions, compile_teacher
    result = compile_teacher(CompileOptions("examples/digits_cnn.py:teacher", out="out/demo", ratios=(0.5,)))
    result.manifest["students"][0]["latency_ms"]

Steps: read the recipe (if any) -> load the profile and the teacher -> plan one pipeline per
student (``--ratio`` values, depth options, or the user's ``--pipeline``) -> run each with the
``PassManager`` on its own ``CompileState`` (the teacher's analysis is shared) -> lower any student
its pipeline did not lower -> write ``student.pt2`` (and ``hf/``), ``manifest.json``, ``report.md``
and ``pareto.png``. All of ``OUT`` is built in a temporary sibling and renamed into place at the
end, so a failed run leaves no ``OUT`` that looks finished. A student of an earlier run into the
same ``OUT`` whose inputs (teacher and data hashes, profile, versions) and pipeline are unchanged is
copied instead of rebuilt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import atomic_path
from .data import load_callable
from .errors import InputError
from .frontend import Teacher, load_calibration, load_teacher
from .manifest import (
    MANIFEST_VERSION,
    architecture,
    cost,
    find_artifact,
    latency_dict,
    now_iso,
    parity_dict,
    save_hf,
    save_program,
    sha256_file,
    sha256_files,
    to_jsonable,
    versions,
    weights_sha256,
    write_manifest,
)
from .pipeline import DumpIRInstrument, PassInstrument, PassManager, TimingInstrument, VerifyInstrument
from .plan import CompileOptions, Plan, apply_recipe, plan_students
from .report import write_report
from .state import CompileState, Student


@dataclass
class CompileResult:
    manifest: dict[str, Any]
    out: Path
    timings: list[TimingInstrument]


# ---------------------------------------------------------------------------------------------
# The run


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _lowered_dir(out: Path, name: str) -> Path:
    return out / "students" / name


def _lower(module: torch.nn.Module, state: CompileState, out_dir: Path, target: str, calib: Any) -> Any:
    from potstill.targets import lower

    return lower(
        module, state.example_inputs, state.profile, out_dir, target=target, example_kwargs=state.example_kwargs,
        dynamic_batch=state.dynamic_batch, calib=calib, hf=state.hf,
    )  # fmt: skip


def _teacher_latency(state: CompileState, scratch: Path, target: str, note: Callable[[str], None]) -> dict[str, Any]:
    """Lower the teacher to the same target (in a scratch folder) so speed-ups compare engines."""
    art = _lower(state.teacher, state, scratch, target, None)
    lat = latency_dict(art.latency_ms)
    if lat is None:
        from potstill.targets import measure_torch_latency

        note(f"note: the {target} engine was not timed here; the teacher's latency is PyTorch's")
        lat = latency_dict(measure_torch_latency(state.teacher, state.example_inputs, state.example_kwargs))
    return {"latency_ms": lat, "parity": parity_dict(art.parity)}


def _collect_files(student_dir: Path, art: Any) -> dict[str, str]:
    """Engine files relative to the student folder (copied in when the target wrote elsewhere)."""
    files: dict[str, str] = {}
    for key, value in (getattr(art, "files", None) or {}).items():
        src = Path(value)
        if not src.exists():
            continue
        try:
            rel = src.resolve().relative_to(student_dir.resolve())
        except ValueError:
            dst = student_dir / src.name
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copy2(src, dst)
            rel = Path(src.name)
        files[str(key)] = str(rel)
    return files


def _student_entry(
    state: CompileState, student: Student, plan: Plan, out: Path, teacher_entry: dict[str, Any]
) -> dict[str, Any]:
    """The manifest record of one student; writes its ``student.pt2`` (and ``hf/``)."""
    student_dir = _lowered_dir(out, student.name)
    student_dir.mkdir(parents=True, exist_ok=True)
    analysis = state.analysis(student)
    art = find_artifact(student.artifacts)
    notes: list[str] = list(getattr(art, "notes", []) or [])
    files = _collect_files(student_dir, art) if art is not None else {}
    profile_batch = getattr(state.profile, "batch", None)
    pt2 = save_program(student.module, state.example_inputs, state.example_kwargs, student_dir / "student.pt2",
                       fixed_batch=profile_batch)  # fmt: skip
    if pt2["file"]:
        files["pt2"] = pt2["file"]
    if pt2["note"]:
        notes.append(f"student.pt2: {pt2['note']}")
    if state.hf is not None:
        notes += save_hf(student.module, state.hf, student_dir / "hf")
        files["hf"] = "hf"
    metric = student.metrics.get("metric")
    if metric is None and state.metric is not None:
        metric = float(state.metric(student.module))
    entry = {
        "name": student.name,
        "dir": str(student_dir.relative_to(out)),
        **cost(analysis),
        "latency_ms": latency_dict(getattr(art, "latency_ms", None)),
        "parity": parity_dict(getattr(art, "parity", None)),
        "target": getattr(art, "target", None),
        "precision": getattr(art, "precision", None),
        "metric": metric,
        "architecture": architecture(analysis),
        "pipeline": [p.spec() for p in plan.passes],
        "history": list(student.history),
        "files": files,
        "dynamic_batch": pt2["dynamic_batch"],
        "metrics": to_jsonable({k: v for k, v in student.metrics.items() if k != "metric"}),
        "notes": notes,
    }
    t_lat, s_lat = teacher_entry.get("latency_ms"), entry["latency_ms"]
    entry["speedup"] = t_lat["median"] / s_lat["median"] if t_lat and s_lat and s_lat["median"] > 0 else None
    entry["macs_reduction"] = teacher_entry["macs"] / entry["macs"] if entry["macs"] else None
    return entry


def _inputs_record(opts: CompileOptions, teacher: Teacher, plans: Sequence[Plan]) -> dict[str, Any]:
    def file_record(spec: str | None) -> dict[str, Any] | None:
        if not spec:
            return None
        path = Path(spec.rsplit(":", 1)[0]) if ".py:" in spec else Path(spec)
        return {"spec": spec, "sha256": sha256_file(path) if path.is_file() else None}

    return {
        "teacher": {
            "spec": teacher.spec,
            "sha256": sha256_files(teacher.sources),
            "weights_sha256": weights_sha256(teacher.module),
        },
        "example_inputs": {
            "args": [list(a.shape) if isinstance(a, torch.Tensor) else repr(a) for a in teacher.example_inputs],
            "kwargs": {k: list(v.shape) if isinstance(v, torch.Tensor) else repr(v) for k, v in teacher.example_kwargs.items()},
        },
        "input_shapes": list(opts.input_shapes),
        "ratios": list(opts.ratios),
        "calib": file_record(opts.calib),
        "data": file_record(opts.data),
        "recipe": file_record(opts.recipe),
        "seed": opts.seed,
        "pipelines": {p.name: p.spec for p in plans},
        "argv_equivalent": _argv(opts),
    }


def _argv(opts: CompileOptions) -> str:
    parts = ["potstill", "compile", str(opts.teacher), "--profile", str(opts.profile)]
    for r in opts.ratios:
        parts += ["--ratio", f"{r:g}"]
    for s in opts.input_shapes:
        parts += ["--input-shape", s]
    for flag, value in (("--pipeline", opts.pipeline), ("--data", opts.data), ("--calib", opts.calib),
                        ("--drop-layers", opts.drop_layers), ("--keep-layers", opts.keep_layers),
                        ("--importance", opts.importance), ("--target", opts.target)):  # fmt: skip
        if value is not None and isinstance(value, (str, int)):
            parts += [flag, f"'{value}'" if isinstance(value, str) and "{" in value else str(value)]
    parts += ["--seed", str(opts.seed), "-o", str(opts.out)]
    return " ".join(parts)


def check_output_folder(out: Path) -> None:
    """OUT is replaced whole at the end: refuse a folder that is not an earlier potstill output."""
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out}: exists and is not a folder")
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise InputError(f"-o {out}: is the working folder or above it; potstill replaces OUT whole, give a new folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise InputError(
            f"-o {out}: the folder has files but no manifest.json, so it is not a potstill output; "
            "potstill replaces OUT whole: give a new folder or empty this one"
        )


def cache_key(inputs: dict[str, Any], profile: Any, target: str, extra: dict[str, Any]) -> str:
    """Hash of everything a student depends on besides its own pipeline."""
    keyed = {k: v for k, v in inputs.items() if k not in ("ratios", "pipelines", "argv_equivalent")}
    blob = json.dumps(to_jsonable([keyed, profile, target, extra, versions()]), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _plan_key(base_key: str, plan: Plan) -> str:
    return hashlib.sha256(f"{base_key}|{plan.spec}".encode()).hexdigest()


def _previous_entries(out: Path, base_key: str) -> dict[str, list[dict[str, Any]]]:
    """Entries of a finished earlier run into ``out`` with the same inputs, by plan name."""
    try:
        old = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("inputs", {}).get("cache_key") != base_key:
        return {}
    found: dict[str, list[dict[str, Any]]] = {"__teacher__": [old["teacher"]]}
    for entry in old.get("students", []):
        if entry.get("plan") and entry.get("cache_key"):
            found.setdefault(str(entry["plan"]), []).append(entry)
    return found


def _copy_previous(out: Path, tmp_out: Path, entries: list[dict[str, Any]]) -> bool:
    """Copy the earlier run's student folders into the new OUT; False when one is missing."""
    dirs = [out / str(e.get("dir", "")) for e in entries]
    if not all(d.is_dir() and d != out for d in dirs):
        return False
    for entry, src in zip(entries, dirs):
        shutil.copytree(src, tmp_out / str(entry["dir"]))
    return True


def compile_teacher(
    opts: CompileOptions,
    note: Callable[[str], None] = print,
    instruments: Sequence[PassInstrument] = (),
) -> CompileResult:
    """Run one compilation; returns the manifest and where ``OUT`` is. Raises ``PotstillError``."""
    from potstill.profiles import DEFAULT_PROFILE, load_profile

    opts = apply_recipe(opts)
    teacher_spec, out_spec = opts.teacher, opts.out
    if not teacher_spec:
        raise InputError("no teacher: give TEACHER (path/to/file.py:FACTORY or hf:PATH) or 'teacher:' in the recipe")
    if not out_spec:
        raise InputError("no output folder: give -o OUT (or 'output:' in the recipe)")
    seed = 0 if opts.seed is None else int(opts.seed)
    opts = replace(opts, profile=opts.profile or DEFAULT_PROFILE, seed=seed)
    out = Path(out_spec)
    check_output_folder(out)
    _seed_everything(seed)
    profile = load_profile(opts.profile or DEFAULT_PROFILE)
    target = opts.target or profile.target
    plans = plan_students(opts, target)  # fails fast on a bad pipeline, before loading anything big

    note(f"loading teacher {teacher_spec}")
    default_shapes = tuple("x".join(map(str, s)) for s in (profile.input_shapes or []))
    teacher = load_teacher(teacher_spec, opts.input_shapes, seed=seed, default_shapes=default_shapes)
    calib = load_calibration(opts.calib, teacher, note=note)
    train = load_callable(opts.data) if opts.data else teacher.hooks.get("train_data")
    evaluation = load_callable(opts.eval_data) if opts.eval_data else teacher.hooks.get("eval_data")
    if train is not None and not opts.pipeline and opts.distill_epochs > 0:
        note(f"training data found: students are distilled from the teacher ({opts.distill_epochs} epochs; --no-distill skips)")
        plans = plan_students(opts, target, distill_epochs=opts.distill_epochs)
    timings: list[TimingInstrument] = []
    timed: list[str] = []
    with atomic_path(out) as tmp_out:
        tmp_out.mkdir(parents=True)

        def new_state() -> CompileState:
            state = CompileState(
                teacher=teacher.module, example_inputs=teacher.example_inputs, example_kwargs=teacher.example_kwargs,
                profile=profile, out_dir=tmp_out, calib_data=calib, train_data=train,
                eval_data=evaluation, metric=teacher.hooks.get("metric"), hf=teacher.hf,
                dynamic_batch=profile.batch is None, seed=seed,
            )  # fmt: skip
            state.records["recipe"] = dict(opts.extra)
            return state

        inputs = _inputs_record(opts, teacher, plans)
        base_key = cache_key(inputs, profile, target, opts.extra)
        previous = {} if (opts.debug or not opts.cache) else _previous_entries(out, base_key)
        base = new_state()
        t_analysis: Any = None

        def teacher_analysis() -> Any:
            nonlocal t_analysis
            if t_analysis is None:
                note("analysing the teacher")
                t_analysis = base.teacher_analysis()
            return t_analysis

        # one state per plan (lowering passes lower every student of a state); the teacher's
        # analysis is shared so it is computed once
        states: list[tuple[Plan, CompileState]] = []
        reused: list[dict[str, Any]] = []
        for plan in plans:
            key = _plan_key(base_key, plan)
            old = previous.get(plan.name)
            if old and all(e.get("cache_key") == key for e in old) and _copy_previous(out, tmp_out, old):
                note(f"student {plan.name}: unchanged since the last run; reusing {out}/students")
                reused += old
                continue
            note(f"student {plan.name}: {plan.spec}")
            _seed_everything(seed)
            state = new_state()
            state.records["_teacher_analysis"] = teacher_analysis()
            state.students.append(Student(plan.name, copy.deepcopy(teacher.module).eval()))
            timing = TimingInstrument()
            insts: list[PassInstrument] = [timing, *instruments]
            if opts.debug:
                insts += [VerifyInstrument(), DumpIRInstrument(directory=tmp_out / "debug" / "ir" / plan.name)]
            state = PassManager(plan.passes, insts).run(state).state
            timings.append(timing)
            timed.append(plan.name)
            for student in state.students:
                if find_artifact(student.artifacts) is None:
                    note(f"student {student.name}: the pipeline did not lower it; lowering to {target}")
                    student.artifacts[target] = _lower(
                        student.module, state, _lowered_dir(tmp_out, student.name), target, calib
                    )
            states.append((plan, state))

        if previous.get("__teacher__") and not states:
            teacher_entry: dict[str, Any] = previous["__teacher__"][0]
        else:
            analysis = teacher_analysis()
            teacher_entry = {
                "spec": teacher.spec, "label": teacher.label, **cost(analysis),
                "metric": float(base.metric(teacher.module)) if base.metric else None,
                "architecture": architecture(analysis), "hf": teacher.hf,
            }  # fmt: skip
            note(f"timing the teacher on {target}")
            teacher_entry.update(_teacher_latency(base, tmp_out.parent / "teacher-engine", target, note))
        entries = [
            {**_student_entry(state, student, plan, tmp_out, teacher_entry), "plan": plan.name,
             "cache_key": _plan_key(base_key, plan)}
            for plan, state in states
            for student in state.students
        ]  # fmt: skip
        order = {p.name: i for i, p in enumerate(plans)}
        entries = sorted(reused + entries, key=lambda e: order.get(str(e.get("plan")), len(order)))
        inputs["cache_key"] = base_key
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "potstill": __version__,
            "created": now_iso(),
            "teacher": teacher_entry,
            "students": entries,
            "inputs": inputs,
            "profile": to_jsonable(profile),
            "target": target,
            "timings": {name: [[n, round(s, 3), c] for n, s, c in t.times] for name, t in zip(timed, timings)},
            "versions": versions(),
        }
        write_report(manifest, tmp_out)
        write_manifest(tmp_out, manifest)  # last: a manifest means the folder is complete
    return CompileResult(to_jsonable(manifest), out, timings)
