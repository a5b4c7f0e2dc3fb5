"""What to build: compile options, recipes, and one plan (name + passes) per student.

With no ``--pipeline`` each ``--ratio R`` gives a student ``w{100R}`` built by
``[importance.<estimator>,]prune.width{ratio=R},lower.<target>`` (the importance pass only with
``--importance``; otherwise ``prune.width`` picks its estimator); ``--drop-layers N`` /
``--keep-layers N`` add ``prune.depth`` (and a tag ``dN`` / ``kN``). A user pipeline is one student,
or one per ``--ratio`` when it contains ``$ratio``. A recipe YAML fills the options the command
line left unset; its paths are relative to the recipe file, and the whole recipe reaches the
passes as ``state.records["recipe"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError
from .pipeline import Pass, build_pipeline, get_pass

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
    #: reuse students of an earlier run into the same OUT whose inputs and pipeline are unchanged
    cache: bool = True
    #: distil default-pipeline students when training data is at hand (epochs; 0 = never)
    distill_epochs: int = 3
    #: evaluation data (FILE.py:FN); default: the teacher file's eval_data
    eval_data: str | None = None
    #: the recipe as written (plus its "path"); passes read it from state.records["recipe"]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """One student to build: its name and the passes that make it."""

    name: str
    passes: list[Pass]

    @property
    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)


# ---------------------------------------------------------------------------------------------
# Recipe and plans

RECIPE_KEYS = {
    "teacher": "teacher", "output": "out", "out": "out", "profile": "profile", "ratio": "ratios",
    "ratios": "ratios", "input_shape": "input_shapes", "input_shapes": "input_shapes",
    "pipeline": "pipeline", "data": "data", "calib": "calib", "eval": "eval_data",
    "drop_layers": "drop_layers", "keep_layers": "keep_layers", "importance": "importance",
    "target": "target", "seed": "seed", "name": "name",
}  # fmt: skip
RECIPE_PATH_KEYS = ("teacher", "data", "calib", "eval_data")  # the output stays relative to the working folder


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
    items = list(data.items())
    if isinstance(data.get("data"), dict):  # the distillation recipe's data: {train, eval, calib}
        items = [(k, v) for k, v in items if k != "data"]
        items += [({"train": "data"}.get(str(k), str(k)), v) for k, v in data["data"].items()]
    for key, value in items:
        attr = RECIPE_KEYS.get(str(key).replace("-", "_"))
        if attr is None:
            continue  # stages, train, version, ...: for the passes, in state.records["recipe"]
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
    raw = {**data, "path": str(path.resolve())}
    return replace(opts, **merged, extra={**raw, **opts.extra})


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


def plan_students(opts: CompileOptions, target: str, distill_epochs: int = 0) -> list[Plan]:
    """One plan per student: the user's pipeline, or the default prune-and-lower per ratio.

    With ``distill_epochs`` (the driver sets it when training data is at hand and ``--no-distill``
    is not given) the default pipeline distils each pruned student from the teacher before lowering.
    """
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
    # no --importance: prune.width chooses (importance=auto, Kwon's mask Fisher when data exists)
    importance = opts.importance
    if importance is not None and "." not in importance:
        importance = f"importance.{importance}"
    plans = []
    width_ratios: list[float | None] = list(ratios) if ratios else [None]
    for r in width_ratios:
        steps = list(depth)
        tags = [depth_tag] if depth_tag else []
        if r is not None:
            steps += [*([importance] if importance else []), f"prune.width{{ratio={r:g}}}"]
            tags.insert(0, _ratio_name(r))
        if distill_epochs > 0:
            steps.append(f"distill{{epochs={distill_epochs}}}")
        steps.append(f"lower.{target}")
        plans.append(Plan("-".join(tags), build_pipeline(",".join(steps))))
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise InputError(f"two students would share a name ({names}); give distinct --ratio values")
    return plans
