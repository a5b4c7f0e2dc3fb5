"""One compilation, start to finish: what ``potstill compile`` runs, callable from Python too.

    from potstill.driver import CompileOptions, compile_teacher
    manifest = compile_teacher(CompileOptions("examples/digits_cnn.py:teacher", out="out/demo"))

Steps: read the recipe (if any) -> load the profile and the teacher -> plan one pipeline per
student (``--ratio`` values, depth options, or the user's ``--pipeline``) -> run each with the
``PassManager`` on a shared ``CompileState`` -> lower any student its pipeline did not lower ->
write ``student.pt2`` (and ``hf/``), ``manifest.json``, ``report.md`` and ``pareto.png``. All of
``OUT`` is built in a temporary sibling and renamed into place at the end, so a failed run leaves
no ``OUT`` that looks finished.
"""

from __future__ import annotations

import copy
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

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
from .pipeline import (
    DumpIRInstrument,
    Pass,
    PassInstrument,
    PassManager,
    TimingInstrument,
    VerifyInstrument,
    build_pipeline,
    get_pass,
)
from .report import write_report
from .state import CompileState, Student

TARGETS = ("onnx", "onnxruntime", "tensorrt", "aoti")
RATIO_PLACEHOLDER = "$ratio"


@dataclass
class CompileOptions:
    """Everything ``potstill compile`` takes; a recipe YAML fills the fields the caller left unset."""

    teacher: str | None = None
    out: str | Path | None = None
    profile: str | None = None
    ratios: tuple[float, ...] = ()
    input_shapes: tuple[str, ...] = ()
    pipeline: str | list[Any] | None = None
    recipe: str | None = None
    data: str | None = None
    calib: str | None = None
    drop_layers: int | None = None
    keep_layers: int | None = None
    importance: str | None = None
    target: str | None = None
    seed: int | None = None
    debug: bool = False
    name: str | None = None
    #: everything else the recipe said (stages, distillation settings); passes read state.records["recipe"]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """One student to build: its name and the passes that make it."""

    name: str
    passes: list[Pass]

    @property
    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)


@dataclass
class CompileResult:
    manifest: dict[str, Any]
    out: Path
    timings: list[TimingInstrument]


# ---------------------------------------------------------------------------------------------
# Recipe and plans

RECIPE_KEYS = {
    "teacher": "teacher", "output": "out", "out": "out", "profile": "profile", "ratio": "ratios",
    "ratios": "ratios", "input_shape": "input_shapes", "input_shapes": "input_shapes",
    "pipeline": "pipeline", "stages": "pipeline", "data": "data", "calib": "calib",
    "drop_layers": "drop_layers", "keep_layers": "keep_layers", "importance": "importance",
    "target": "target", "seed": "seed", "name": "name",
}  # fmt: skip
RECIPE_PATH_KEYS = ("teacher", "data", "calib")  # the output stays relative to the working folder


def apply_recipe(opts: CompileOptions) -> CompileOptions:
    """Fill unset options from ``opts.recipe`` (YAML); paths in it are relative to the recipe file."""
    if not opts.recipe:
        return opts
    path = Path(opts.recipe)
    if not path.is_file():
        raise InputError(f"--recipe '{path}': no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InputError(f"--recipe '{path}': not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"--recipe '{path}': expected a mapping of settings (teacher:, pipeline:, ...)")
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        attr = RECIPE_KEYS.get(str(key).replace("-", "_"))
        if attr is None:
            extra[str(key)] = value
            continue
        if attr in RECIPE_PATH_KEYS and isinstance(value, str):
            value = _resolve_recipe_path(value, path.parent)
        if attr in ("ratios", "input_shapes"):
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        values[attr] = value
    merged = {}
    for f in fields(opts):
        current = getattr(opts, f.name)
        unset = current is None or current == () or (f.name == "extra" and not current)
        if unset and f.name in values:
            merged[f.name] = values[f.name]
    return replace(opts, **merged, extra={**extra, **opts.extra})


def _resolve_recipe_path(value: str, base: Path) -> str:
    if value.startswith("hf:"):
        rest = value[3:]
        return "hf:" + (rest if Path(rest).is_absolute() else str(base / rest))
    file_part, sep, name = value.partition(".py:")
    file_part += ".py" if sep else ""
    resolved = file_part if Path(file_part).is_absolute() else str(base / file_part)
    return f"{resolved}:{name}" if sep else resolved


def _pipeline_items(spec: str | list[Any]) -> list[str | Pass]:
    """A pipeline string, or a recipe list of strings and ``{name: {option: value}}`` mappings."""
    if isinstance(spec, str):
        return [spec]
    items: list[str | Pass] = []
    for item in spec:
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, dict) and len(item) == 1:
            (name, opts), = item.items()
            items.append(get_pass(str(name))(**(opts or {})))
        else:
            raise InputError(f"pipeline entry {item!r}: write 'name{{k=v}}' or a mapping {{name: {{k: v}}}}")
    return items


def _ratio_name(ratio: float) -> str:
    return f"w{round(ratio * 100):d}"


def _check_ratio(ratio: float) -> float:
    if not 0.0 < ratio < 1.0:
        raise InputError(f"--ratio {ratio}: expected a fraction of channels to remove, between 0 and 1")
    return ratio


def _depth_steps(opts: CompileOptions) -> tuple[list[str], str]:
    if opts.drop_layers is None and opts.keep_layers is None:
        return [], ""
    if opts.drop_layers is not None and opts.keep_layers is not None:
        raise InputError("give --drop-layers or --keep-layers, not both")
    if opts.drop_layers is not None:
        if opts.drop_layers < 1:
            raise InputError(f"--drop-layers {opts.drop_layers}: must be at least 1")
        step, tag = f"prune.depth{{drop={opts.drop_layers}}}", f"d{opts.drop_layers}"
    else:
        if opts.keep_layers is None or opts.keep_layers < 1:
            raise InputError(f"--keep-layers {opts.keep_layers}: must be at least 1")
        step, tag = f"prune.depth{{keep={opts.keep_layers}}}", f"k{opts.keep_layers}"
    steps = [step]
    if "block_importance" in get_pass("prune.depth").requires:
        steps.insert(0, "importance.blocks")
    return steps, tag


def plan_students(opts: CompileOptions, target: str) -> list[Plan]:
    """One plan per student: the user's pipeline, or the default prune-and-lower per ratio."""
    if target not in TARGETS:
        raise InputError(f"--target '{target}': expected one of {', '.join(TARGETS)}")
    ratios = [_check_ratio(float(r)) for r in opts.ratios]
    if opts.pipeline:
        text = opts.pipeline if isinstance(opts.pipeline, str) else None
        if ratios and (text is None or RATIO_PLACEHOLDER not in text):
            raise InputError(
                "--ratio with --pipeline: write the ratio into the pipeline (prune.width{ratio=0.5}) "
                f"or use '{RATIO_PLACEHOLDER}' there to build one student per --ratio"
            )
        if text is not None and RATIO_PLACEHOLDER in text:
            if not ratios:
                raise InputError(f"the pipeline uses '{RATIO_PLACEHOLDER}': give --ratio")
            return [Plan(_ratio_name(r), build_pipeline(text.replace(RATIO_PLACEHOLDER, f"{r:g}"))) for r in ratios]
        return [Plan(opts.name or "student", build_pipeline(_pipeline_items(opts.pipeline)))]
    depth, depth_tag = _depth_steps(opts)
    if not ratios and not depth:
        ratios = [0.5]
    importance = opts.importance or "magnitude"
    importance = importance if "." in importance else f"importance.{importance}"
    plans = []
    width_ratios: list[float | None] = list(ratios) if ratios else [None]
    for r in width_ratios:
        steps = list(depth)
        tags = [depth_tag] if depth_tag else []
        if r is not None:
            steps += [importance, f"prune.width{{ratio={r:g}}}"]
            tags.insert(0, _ratio_name(r))
        steps.append(f"lower.{target}")
        plans.append(Plan("-".join(tags), build_pipeline(",".join(steps))))
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise InputError(f"two students would share a name ({names}); give distinct --ratio values")
    return plans


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
        lat = latency_dict(measure_torch_latency(state.teacher, state.example_inputs))
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
    _seed_everything(seed)
    profile = load_profile(opts.profile or DEFAULT_PROFILE)
    target = opts.target or profile.target
    plans = plan_students(opts, target)  # fails fast on a bad pipeline, before loading anything big

    note(f"loading teacher {teacher_spec}")
    default_shapes = tuple("x".join(map(str, s)) for s in (profile.input_shapes or []))
    teacher = load_teacher(teacher_spec, opts.input_shapes, seed=seed, default_shapes=default_shapes)
    calib = load_calibration(opts.calib, teacher, note=note)
    train = load_callable(opts.data) if opts.data else teacher.hooks.get("train_data")
    timings: list[TimingInstrument] = []
    with atomic_path(out) as tmp_out:
        tmp_out.mkdir(parents=True)

        def new_state() -> CompileState:
            state = CompileState(
                teacher=teacher.module, example_inputs=teacher.example_inputs, example_kwargs=teacher.example_kwargs,
                profile=profile, out_dir=tmp_out, calib_data=calib, train_data=train,
                eval_data=teacher.hooks.get("eval_data"), metric=teacher.hooks.get("metric"), hf=teacher.hf,
                dynamic_batch=profile.batch is None, seed=seed,
            )  # fmt: skip
            state.records["recipe"] = dict(opts.extra)
            return state

        note("analysing the teacher")
        base = new_state()
        t_analysis = base.teacher_analysis()
        # one state per plan (lowering passes lower every student of a state); the teacher's
        # analysis is shared so it is computed once
        states: list[tuple[Plan, CompileState]] = []
        for plan in plans:
            note(f"student {plan.name}: {plan.spec}")
            _seed_everything(seed)
            state = new_state()
            state.records["_teacher_analysis"] = t_analysis
            state.students.append(Student(plan.name, copy.deepcopy(teacher.module).eval()))
            timing = TimingInstrument()
            insts: list[PassInstrument] = [timing, *instruments]
            if opts.debug:
                insts += [VerifyInstrument(), DumpIRInstrument(directory=tmp_out / "debug" / "ir" / plan.name)]
            state = PassManager(plan.passes, insts).run(state).state
            timings.append(timing)
            for student in state.students:
                if find_artifact(student.artifacts) is None:
                    note(f"student {student.name}: the pipeline did not lower it; lowering to {target}")
                    student.artifacts[target] = _lower(
                        student.module, state, _lowered_dir(tmp_out, student.name), target, calib
                    )
            states.append((plan, state))

        teacher_entry: dict[str, Any] = {
            "spec": teacher.spec, "label": teacher.label, **cost(t_analysis),
            "metric": float(base.metric(teacher.module)) if base.metric else None,
            "architecture": architecture(t_analysis), "hf": teacher.hf,
        }  # fmt: skip
        note(f"timing the teacher on {target}")
        teacher_entry.update(_teacher_latency(base, tmp_out.parent / "teacher-engine", target, note))
        entries = [
            _student_entry(state, student, plan, tmp_out, teacher_entry)
            for plan, state in states
            for student in state.students
        ]
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "potstill": __version__,
            "created": now_iso(),
            "teacher": teacher_entry,
            "students": entries,
            "inputs": _inputs_record(opts, teacher, plans),
            "profile": to_jsonable(profile),
            "target": target,
            "timings": {p.name: [[n, round(s, 3), c] for n, s, c in t.times] for p, t in zip(plans, timings)},
            "versions": versions(),
        }
        write_report(manifest, tmp_out)
        write_manifest(tmp_out, manifest)  # last: a manifest means the folder is complete
    return CompileResult(to_jsonable(manifest), out, timings)
