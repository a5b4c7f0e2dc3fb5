"""One compilation, start to finish: what ``potstill compile`` runs (``potstill.compile`` wraps it).

    from potstill.driver import CompileOptions, compile_teacher
    result = compile_teacher(CompileOptions("examples/digits_cnn.py:teacher", out="out/demo", ratios=(0.5,)))
    result.manifest["students"][0]["latency_ms"]

The driver does three things and nothing else:

1. **prepare** (``prepare``): read the recipe, load plugins, check every flag and OUT, load the
   profile and the teacher, check its dtype, inputs and ``metric()`` once, split the calibration
   batches into calibration and held-out, and plan one pipeline per student (``potstill.plan``;
   every plan ends in ``lower.<target>`` and ``record``) plus the teacher's (``record.teacher``);
2. **run** the teacher's plan first, then one ``PassManager`` per student plan on a fork of one
   ``CompileState`` (students are copy-on-write copies of the one reference teacher, which nothing
   mutates; ``potstill.ir.cow``), reusing a cached student whose key and file hashes match;
3. **build the manifest** from what the passes recorded (``potstill.outputs.manifest.build_manifest``).

``OUT`` is built in a locked temporary sibling and swapped in atomically (``potstill.outputs.outdir``).
Distillation checkpoints live in OUT's stable work area, so a killed run resumes. Under
``torchrun`` every rank trains; rank 0 alone analyses, lowers and writes (see ``potstill.ranks``
in ``DistributedInstrument``).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from potstill.errors import InputError
from potstill.inputs.calibration import image_input, load_calibration, load_data, random_calibration_warning
from potstill.inputs.data import as_batch, load_callable
from potstill.inputs.guard import TeacherGuard, check_finite_batches
from potstill.inputs.memory import module_weights, preflight_memory, release_freed_memory
from potstill.inputs.teacher import (
    Teacher,
    check_input_shapes,
    load_teacher,
    normalise_teacher,
    run_teacher_once,
)
from potstill.outputs.atomic import atomic_write_json
from potstill.outputs.cachekey import artifact_hashes, batches_sha256, cache_key, local_sources, plan_key
from potstill.outputs.manifest import build_manifest, student_entry, write_manifest
from potstill.outputs.outdir import OutputFolder, inside
from potstill.outputs.report import warnings as report_warnings
from potstill.outputs.report import write_report
from potstill.pipeline import (
    DumpIRInstrument,
    PassInstrument,
    PassManager,
    TimingInstrument,
    VerifyInstrument,
)
from potstill.plan import (
    DEFAULT_DISTILL_EPOCHS,
    CompileOptions,
    Plan,
    StudentPlanner,
    apply_recipe,
    teacher_plan,
)
from potstill.plugins import load_plugins
from potstill.progress import PassProgress
from potstill.ranks import DistributedInstrument, Ranks
from potstill.state import CompileState
from rich.console import Console

Note = Callable[[str], None]


@dataclass
class CompileResult:
    manifest: dict[str, Any]
    out: Path
    timings: list[TimingInstrument]
    warnings: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """Everything a run needs, checked: the options, the base state, the plans, the cache key."""

    opts: CompileOptions
    teacher: Teacher
    state: CompileState
    plans: list[Plan]
    target: str
    inputs: dict[str, Any]
    base_key: str
    folder: OutputFolder
    ranks: Ranks


# ---------------------------------------------------------------------------------------------
# 1. prepare


def _silent(message: str) -> None:
    return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _float32(batch: Any) -> Any:
    """A batch with its floating tensors in float32 (the teacher was converted)."""
    b = as_batch(batch)

    def f(x: Any) -> Any:
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return replace(b, args=tuple(f(a) for a in b.args), kwargs={k: f(v) for k, v in b.kwargs.items()})


def _float32_source(source: Callable[[], Iterable[Any]]) -> Callable[[], Iterator[Any]]:
    """A data source whose batches come in float32, like the converted teacher."""
    return lambda: (_float32(b) for b in source())


#: batches of --data / train_data() that calibrate when neither --calib nor calib_data() exists
CALIB_FROM_DATA_BATCHES = 16
#: what --calib reads: at most CALIB_BATCHES batches of CALIB_BATCH_SIZE (images: that many files)
CALIB_BATCH_SIZE, CALIB_BATCHES = 8, 16
#: below this many calibration samples (after the held-out split) the console says the estimates are noisy;
#: the digits CNN at --ratio 0.7 kept 0.800 accuracy on 192 samples and 0.942 on 1,078
FEW_CALIB_SAMPLES = 512


def _iterate(source: Any) -> Any:
    return iter(source() if callable(source) else source)


def _calibration_prefix(batches: Iterator[Any], cap: int = 8 * CALIB_FROM_DATA_BATCHES) -> Iterator[Any]:
    """The first batches of the training data that calibrate: at least ``CALIB_FROM_DATA_BATCHES``,
    and more (up to ``cap``) until the part left after the held-out quarter has ``FEW_CALIB_SAMPLES``
    samples (a text corpus read 8 sentences a batch needs 86 batches for 512)."""
    samples = 0
    for i, batch in enumerate(islice(batches, cap)):
        if i >= CALIB_FROM_DATA_BATCHES and 0.75 * samples >= FEW_CALIB_SAMPLES:
            return
        samples += as_batch(batch).size
        yield batch


def _materialise(source: Any, what: str) -> list[Any]:
    try:
        return list(source() if callable(source) else source)
    except Exception as e:
        raise InputError(f"{what}: reading the batches failed: {type(e).__name__}: {e}") from e


def prepare(opts: CompileOptions, note: Note = print) -> Prepared:
    """Step 1: check and load everything; raises ``InputError`` before any heavy work."""
    from potstill.fidelity import infer_task, split_heldout
    from potstill.inputs.corpus import is_text_file
    from potstill.profiles import DEFAULT_PROFILE, load_profile

    opts = apply_recipe(opts)
    teacher_spec, out_spec = opts.teacher, opts.out
    if not teacher_spec:
        raise InputError("no teacher: give TEACHER (path/to/file.py:FACTORY or hf:PATH) or 'teacher:' in the recipe")
    if not out_spec:
        raise InputError("no output folder: give -o OUT (or 'output:' in the recipe)")
    planner = StudentPlanner(opts)  # the flags and each --ratio, checked once
    seed = 0 if opts.seed is None else int(opts.seed)
    opts = replace(opts, profile=opts.profile or DEFAULT_PROFILE, seed=seed)
    plugin_files = load_plugins(opts.plugins, note)
    folder = OutputFolder(Path(out_spec), force=opts.force)
    ranks = Ranks.detect()
    if ranks.is_writer:
        folder.preflight()
        _refuse_inputs_inside(Path(out_spec), opts, plugin_files)
    else:  # rank 0 speaks for all
        note = _silent
    _seed_everything(seed)
    profile = load_profile(opts.profile)
    target = opts.target or profile.target
    planner.draft(target, profile)  # fails fast on a bad pipeline, before loading anything big
    if target in ("onnx", "onnxruntime") and profile.tries_int8():
        from potstill.targets.int8 import require_int8_mode

        require_int8_mode(profile.int8.mode)

    check_input_shapes(opts.input_shapes)
    # one student is alive at a time (each is recorded and dropped before the next)
    data = (opts.calib, opts.data)
    # image folders count as read: --calib up to its batches, --data whole
    folders = (("--calib", opts.calib, CALIB_BATCH_SIZE * CALIB_BATCHES), ("--data", opts.data, None))
    sized = preflight_memory(teacher_spec, max_memory=opts.max_memory, data=data, images=folders, note=note)  # hf:DIR, before loading
    note(f"loading teacher {teacher_spec}")
    default_shapes = tuple("x".join(map(str, s)) for s in (profile.input_shapes or []))
    seq = opts.sequence_length
    if seq is None and str(teacher_spec).startswith("hf:"):
        seq = getattr(profile, "sequence_length", None)  # the profile's timing shape, for text teachers
    teacher = load_teacher(teacher_spec, opts.input_shapes, seed=seed, default_shapes=default_shapes,
                           sequence_length=seq, trust_remote_code=opts.trust_remote_code, note=note)  # fmt: skip
    converted = normalise_teacher(teacher, note)
    if sized is None:
        pixels = image_input(teacher)
        preflight_memory(teacher.module, max_memory=opts.max_memory, data=data, images=folders,
                         image_chw=pixels[1] if pixels is not None else None, note=note)
    example_output = run_teacher_once(teacher)
    if opts.min_fidelity is not None:
        profile = profile.model_copy(update={"min_fidelity": float(opts.min_fidelity)})
    train = load_data(opts.data, teacher, "--data", note=note) if opts.data else teacher.hooks.get("train_data")
    if converted and train is not None:
        train = _float32_source(train)
    train_label = "--data" if opts.data else "train_data() in the teacher file"
    calib_from_data = train is not None and not opts.calib and "calib_data" not in teacher.hooks
    if calib_from_data:  # one data story: the first batches of the training data calibrate (a quarter held out)
        calib_batches = _materialise(lambda: _calibration_prefix(_iterate(train)), "calibration data")
    else:
        calib_source = load_calibration(opts.calib, teacher, batch_size=CALIB_BATCH_SIZE, num_batches=CALIB_BATCHES,
                                        note=note)
        calib_batches = _materialise(calib_source, "calibration data") if calib_source is not None else []
    if converted and not calib_from_data:  # train is already float32
        calib_batches = [_float32(b) for b in calib_batches]
    # a --calib corpus or image folder is unlabelled data the user gave: the default repair distils on it
    # (its calibration part; the held-out quarter is never trained on)
    calib_trains = train is None and bool(opts.calib) and (is_text_file(str(opts.calib)) or Path(str(opts.calib)).is_dir())
    calib_label = train_label if calib_from_data else (f"--calib {opts.calib}" if opts.calib else
                  "calib_data() in the teacher file" if "calib_data" in teacher.hooks else "built-in text")  # fmt: skip
    check_finite_batches(calib_batches, calib_label)
    if len(calib_batches) == 1 and as_batch(calib_batches[0]).size < 2:
        note("note: the calibration data is one sample: fidelity is measured on it too (no held-out split)")
        calib, heldout = calib_batches, calib_batches
    else:
        calib, heldout = split_heldout(calib_batches) if calib_batches else ([], [])
    if not calib_batches:
        warning = random_calibration_warning(teacher)
        note(f"warning: {warning}" if warning else "warning: no calibration data (--calib): data-driven steps use "
             "random inputs and fidelity is measured on random inputs shaped like the example inputs")  # fmt: skip
    if calib_from_data and heldout and train is not None:  # fidelity is measured on batches training never saw
        from potstill.passes.distill.batches import Without

        train = Without(train, heldout)
    if calib_batches:
        note(f"calibrating on {calib_label}: {len(calib)} batches, {len(heldout)} held out for fidelity")
        samples = sum(as_batch(b).size for b in calib)
        if samples < FEW_CALIB_SAMPLES:
            note(f"note: {samples} calibration samples after the held-out split; importance scores and the "
                 f"least-squares refit are noisy below {FEW_CALIB_SAMPLES} (give more with --calib)")  # fmt: skip
    evaluation = load_callable(opts.eval_data) if opts.eval_data else teacher.hooks.get("eval_data")
    metric = teacher.hooks.get("metric")
    state = CompileState.from_teacher(
        teacher.module, teacher.example_inputs, profile=profile, example_kwargs=teacher.example_kwargs,
        calib_data=(lambda: iter(calib)) if calib else None, heldout_data=(lambda: iter(heldout)) if heldout else None,
        train_data=train, eval_data=evaluation, metric=metric, hf=teacher.hf, seed=seed, work_dir=folder.work_dir,
        teacher_spec=teacher.spec,
    )  # fmt: skip
    if not heldout:  # fidelity is measured for every student, on random inputs when nothing else exists
        from potstill.passes.importance.base import random_batches

        heldout = random_batches(state, teacher.module, 4)
        state.heldout_data = lambda: iter(heldout)
    if metric is not None:
        from potstill.targets.passes import run_metric

        state.shared.metric = run_metric(metric, teacher.module, "teacher")  # once, up front
        state.restore_teacher()
    task = infer_task(teacher.module, teacher.hf, example_output)
    del example_output
    distill_epochs, distill = _default_distillation(opts, teacher, task, train is not None or calib_trains, note)
    plans = planner.plans(distill_epochs=distill_epochs, distill=distill, state=state)
    sources = local_sources([*teacher.sources, *plugin_files, *_spec_files(opts)], extra=plugin_files)
    inputs = _inputs_record(opts, teacher, plans, sources)
    inputs["calib"]["batches_sha256"] = batches_sha256(calib_batches) if calib_batches else None
    inputs["calib"].update(random=not calib_batches, batches=len(calib), heldout_batches=len(heldout),
                           source="data" if calib_from_data else "calib" if calib_batches else "random")
    if train is not None:
        inputs["data"] = {**(inputs["data"] or {}), "batches_sha256": batches_sha256(_materialise(train, "training data"))}
    base_key = cache_key(inputs, profile, target)
    inputs["cache_key"] = base_key
    return Prepared(opts, teacher, state, plans, target, inputs, base_key, folder, ranks)


def _default_distillation(opts: CompileOptions, teacher: Teacher, task: str, has_data: bool,
                          note: Note) -> tuple[int | None, str | None]:  # fmt: skip
    """The default pipeline's distillation: ``(epochs, distill{...} step)``, or Nones when none runs
    (``potstill.passes.distill.defaults``: label-free KD chosen by the teacher's task)."""
    from potstill.passes.distill.defaults import default_distill_options, distill_spec

    flags = [f for f, on in (("--distill-epochs", opts.distill_epochs is not None),
                             ("--train-minutes", opts.train_minutes is not None), ("--no-augment", not opts.augment)) if on]
    images = image_input(teacher) is not None
    if not opts.augment and not images:
        raise InputError(f"--no-augment: {teacher.label} takes no images ([N, C, H, W]); there is nothing to augment; drop the flag")
    if opts.pipeline or not opts.distill:
        return None, None
    if not has_data:
        if flags:
            raise InputError(f"{', '.join(flags)}: there is no training data to distil on, so no training would run; give "
                             "--data FILE.py:FN|corpus.txt|IMAGES/ (or train_data() in the teacher file), or drop the flag")  # fmt: skip
        note("note: no training data: students are pruned but not distilled (give --data to distil)")
        return None, None
    minutes = opts.train_minutes
    epochs = opts.distill_epochs or (None if minutes is not None else DEFAULT_DISTILL_EPOCHS)
    if opts.elastic:
        how = " and ".join(x for x in (f"{opts.distill_epochs} epochs" if opts.distill_epochs else "",
                                       f"at most {minutes:g} min" if minutes else "") if x)
        how = how or "elastic.train's step budget"
        note(f"training data found: the supernet trains from the teacher ({how}; --no-distill skips)")
        return opts.distill_epochs or DEFAULT_DISTILL_EPOCHS, None
    given = (getattr(opts.recipe_data, "train", None) or {}).keys()
    options = default_distill_options(task, epochs=epochs, minutes=minutes, images=images, augment=opts.augment, given=given)
    how = " and ".join(x for x in (f"{epochs} epochs" if epochs else "", f"at most {minutes:g} min" if minutes else "") if x)
    source = "the training data" if opts.data or "train_data" in teacher.hooks else f"--calib {opts.calib} (its calibration part)"
    note(f"training data found: students are distilled from the teacher on {source} without labels "
         f"({options.get('method', 'kd')}, {how}; --no-distill skips)")  # fmt: skip
    return epochs, distill_spec(options)


def _spec_path(spec: str) -> Path:
    """The local file or folder a teacher, data or recipe spec names (``hf:DIR``, ``file.py:FN``, ``PATH``)."""
    if spec.startswith("hf:"):
        return Path(spec[3:])
    return Path(spec.rsplit(":", 1)[0]) if ".py:" in spec else Path(spec)


def _refuse_inputs_inside(out: Path, opts: CompileOptions, plugin_files: Sequence[Path]) -> None:
    """OUT is replaced whole at the end of a run: a teacher, data, recipe or plugin inside it would be
    deleted with it, so that is an error before any work."""
    root = out.resolve()
    named = [("teacher", opts.teacher), ("--data", opts.data), ("--calib", opts.calib),
             ("--eval-data", opts.eval_data), ("--recipe", opts.recipe)]
    paths = [(flag, _spec_path(spec)) for flag, spec in named if spec]
    paths += [("--plugin", Path(f)) for f in plugin_files]
    for flag, path in paths:
        resolved = path.resolve()
        if resolved == root or root in resolved.parents:
            raise InputError(f"{flag} {path}: lies inside -o {out}, which potstill replaces whole at the end of "
                             "the run; move it out of OUT or give another -o")


def _spec_files(opts: CompileOptions) -> list[Path]:
    out = []
    for spec in (opts.data, opts.calib, opts.eval_data, opts.recipe):
        if spec:
            path = Path(spec.rsplit(":", 1)[0]) if ".py:" in spec else Path(spec)
            if path.is_file():
                out.append(path)
    return out


def _inputs_record(opts: CompileOptions, teacher: Teacher, plans: Sequence[Plan], sources: dict[str, str]) -> dict[str, Any]:
    from potstill.outputs.manifest import sha256_file, sha256_files, weights_sha256

    def file_record(spec: str | None) -> dict[str, Any]:
        if not spec:
            return {"spec": None, "sha256": None}
        path = Path(spec.rsplit(":", 1)[0]) if ".py:" in spec else Path(spec)
        return {"spec": spec, "sha256": sha256_file(path) if path.is_file() else None}

    return {
        "teacher": {"spec": teacher.spec, "sha256": sha256_files(teacher.sources),
                    "weights_sha256": weights_sha256(teacher.module)},
        "sources": sources,
        "example_inputs": {
            "args": [list(a.shape) if isinstance(a, torch.Tensor) else repr(a) for a in teacher.example_inputs],
            "kwargs": {k: list(v.shape) if isinstance(v, torch.Tensor) else repr(v) for k, v in teacher.example_kwargs.items()},
        },
        "input_shapes": list(opts.input_shapes),
        "sequence_length": opts.sequence_length,
        "ratios": list(opts.ratios),
        "calib": file_record(opts.calib),
        "data": file_record(opts.data),
        "recipe": file_record(opts.recipe),
        "plugins": list(opts.plugins),
        "seed": opts.seed,
        "pipelines": {p.name: p.spec for p in plans},
    }


# ---------------------------------------------------------------------------------------------
# 2. run


def _previous(out: Path, base_key: str) -> dict[str, Any]:
    """The earlier manifest in ``out`` when its inputs key matches, else {}."""
    import json

    try:
        old = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or (old.get("inputs") or {}).get("cache_key") != base_key:
        return {}
    return old


def _reuse(out: Path, tmp: Path, old: dict[str, Any], plan: Plan, key: str, note: Note) -> list[dict[str, Any]] | None:
    """The earlier run's entries of ``plan`` copied into ``tmp`` when key and file hashes match."""
    entries = [e for e in old.get("students", []) if e.get("plan") == plan.name]
    if not entries or any(e.get("cache_key") != key for e in entries):
        return None
    for e in entries:
        src = inside(out, str(e.get("dir", "")))
        recorded = e.get("sha256") or {}
        if not src.is_dir() or not recorded or artifact_hashes(src) != recorded:
            note(f"student {plan.name}: cached files changed or are missing; rebuilding")
            return None
    for e in entries:
        shutil.copytree(inside(out, str(e["dir"])), tmp / str(e["dir"]))
    return entries


def _instruments(p: Prepared, plan: Plan, tmp: Path, extra: Sequence[PassInstrument]) -> tuple[TimingInstrument, list[PassInstrument]]:
    timing = TimingInstrument()
    insts: list[PassInstrument] = [DistributedInstrument(p.ranks), timing, *extra]
    if p.opts.debug:
        insts += [VerifyInstrument(), DumpIRInstrument(directory=tmp / "debug" / "ir" / plan.name)]
    return timing, insts


def sync_work_dir(p: Prepared, note: Note) -> None:
    """Keep the checkpoints of students whose plan key is unchanged (or all with ``--resume``);
    discard the others, so distillation never resumes from another run's inputs."""
    work = p.folder.work_dir
    keys = {plan.name: plan_key(p.base_key, plan.spec) for plan in p.plans}
    record = work / "run.json"
    try:
        old = json.loads(record.read_text(encoding="utf-8")).get("plans", {})
    except (OSError, ValueError, AttributeError):
        old = {}
    ckpts = work / "checkpoints"
    for folder in sorted(ckpts.iterdir()) if ckpts.is_dir() else []:
        if not folder.is_dir():
            continue
        name = folder.name
        if name in keys and (p.opts.resume or old.get(name) == keys[name]):
            if any(folder.iterdir()):
                changed = "" if old.get(name) == keys[name] else " (--resume: its inputs changed since)"
                note(f"student {name}: resuming distillation from the checkpoints of a killed run{changed}")
            continue
        shutil.rmtree(folder)
        if name in keys:
            note(f"student {name}: discarded the checkpoints of a run with other inputs (--resume keeps them)")
    caches = work / "teacher-cache"
    if not p.opts.cache and caches.is_dir() and not caches.is_symlink():  # --no-cache: the teacher's outputs too
        from potstill.passes.distill.teacher_cache import remove_teacher_caches

        removed = remove_teacher_caches(caches)  # teacher-cache/<key>/: one cache per teacher and data
        if removed:
            note(f"--no-cache: cleared the teacher-output cache in {caches} ({removed} files)")
    if p.opts.resume and not any(ckpts.glob("*/*")):
        note("note: --resume: there are no checkpoints to resume from; training starts afresh")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"plans": keys, "inputs": p.inputs})


def run_plans(p: Prepared, tmp: Path, note: Note, instruments: Sequence[PassInstrument] = ()) -> tuple[list[dict[str, Any]], dict[str, TimingInstrument], dict[str, Any]]:
    """Step 2: one PassManager per plan; returns the student entries, timings and the teacher's record."""
    out = Path(p.folder.path)
    old = {} if (p.opts.debug or not p.opts.cache or not p.ranks.is_writer) else _previous(out, p.base_key)
    base = p.state.fork(out_dir=tmp)
    entries: list[dict[str, Any]] = []
    timings: dict[str, TimingInstrument] = {}
    progress = PassProgress([(plan.name, plan.passes) for plan in p.plans], module_weights(p.state.teacher)[0],
                            extra_steps=["lower"] if p.opts.teacher_timing else [],
                            enabled=p.ranks.is_writer and p.opts.progress, console=Console(stderr=True))
    instruments = [*instruments, progress, TeacherGuard()]
    with progress:
        # the teacher first: its engine (the largest ONNX Runtime session) is built before any student
        # has left allocator leftovers behind, so the peak is the teacher's session, not both
        teacher_record: dict[str, Any] = {}
        if p.ranks.is_writer:
            previous = old.get("teacher") or {}
            # the inputs key covers the teacher, data, profile and target: its record holds for any students
            if previous and (previous.get("latency_ms") or not p.opts.teacher_timing):
                note("teacher: unchanged since the last run; reusing its record and engine timing")
                teacher_record = previous
            else:
                note(f"timing the teacher on {p.target}" if p.opts.teacher_timing
                     else "note: the teacher is not lowered or timed (--no-teacher-timing): no speed-ups")  # fmt: skip
                plan = teacher_plan(p.target, timing=p.opts.teacher_timing)
                timing, insts = _instruments(p, plan, tmp, instruments)
                PassManager(plan.passes, insts).run(base)
                timings["teacher"] = timing
                teacher_record = {"spec": p.teacher.spec, "label": p.teacher.label, **base.shared.record}
                release_freed_memory()
        for plan in p.plans:
            key = plan_key(p.base_key, plan.spec)
            reused = _reuse(out, tmp, old, plan, key, note) if old else None
            if reused is not None:
                note(f"student {plan.name}: unchanged since the last run; reusing it")
                entries += reused
                continue
            note(f"student {plan.name}: {plan.spec}")
            _seed_everything(p.state.seed)
            if plan.profile is None:
                state = base.fork()
            else:  # an elastic plan for another device
                from potstill.profiles import load_profile

                state = base.fork(profile=load_profile(plan.profile))
            state.students.append(state.new_student(plan.name, share=True))  # copy-on-write (potstill.ir.cow)
            timing, insts = _instruments(p, plan, tmp, instruments)
            try:
                state = PassManager(plan.passes, insts).run(state).state
            finally:
                state.restore_teacher()
            timings[plan.name] = timing
            if p.ranks.is_writer:
                shutil.rmtree(p.folder.work_dir / "checkpoints" / plan.name, ignore_errors=True)  # done: in OUT now
                for student in state.students:
                    entry = student_entry(state, student, plan, tmp)
                    entries.append({**entry, "plan": plan.name, "cache_key": key,
                                    "sha256": artifact_hashes(tmp / entry["dir"])})  # fmt: skip
            del state  # the student's weights go before the next one is built
            release_freed_memory()
    return entries, timings, teacher_record


# ---------------------------------------------------------------------------------------------
# 3. the whole compile


def compile_teacher(
    opts: CompileOptions,
    note: Note = print,
    instruments: Sequence[PassInstrument] = (),
) -> CompileResult:
    """Run one compilation; returns the manifest and where ``OUT`` is. Raises ``PotstillError``."""
    t0 = time.perf_counter()
    p = prepare(opts, note)
    prep_s = time.perf_counter() - t0
    if not p.ranks.is_writer:  # other ranks train with rank 0, then wait for it to write OUT
        scratch = p.folder.work_dir / f"rank{p.ranks.rank}"
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            run_plans(p, scratch, note, instruments)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        # only on success: a rank that fails exits, and torchrun stops the others (a barrier would hang)
        p.ranks.barrier()
        return CompileResult({}, p.folder.path, [])
    with p.folder as tmp:
        try:
            for line in p.folder.notes:
                note(line)
            sync_work_dir(p, note)
            entries, timings, teacher_record = run_plans(p, tmp, note, instruments)
            order = {plan.name: i for i, plan in enumerate(p.plans)}
            entries.sort(key=lambda e: order.get(str(e.get("plan")), len(order)))
            manifest = build_manifest(teacher_record, entries, p.inputs, p.state.profile, p.target, timings,
                                      prepare_s=prep_s, total_s=time.perf_counter() - t0)  # fmt: skip
            write_report(manifest, tmp)
            write_manifest(tmp, manifest)  # last: a manifest means the folder is complete
        except BaseException:  # still under the lock: no other run is using the work area
            kept = p.folder.keep_work_after_failure()
            if kept:
                note(kept)
            raise
    p.ranks.barrier()  # the other ranks wait until OUT is written
    # every student is in OUT: checkpoints and the teacher's scratch engine are no longer needed
    shutil.rmtree(p.folder.work_dir, ignore_errors=True)
    warnings = [f"student {e['name']}: {n}" for e in entries for n in e.get("notes", []) if n.startswith("OVER BUDGET")]
    warnings += report_warnings(manifest)  # fidelity below the floor or NaN, not distilled, random calibration
    for w in warnings:
        note(f"warning: {w}")
    return CompileResult(manifest, p.folder.path, list(timings.values()), warnings)


__all__ = ["CompileOptions", "CompileResult", "Prepared", "as_batch", "compile_teacher", "prepare", "run_plans"]
