"""What to build: compile options, a recipe applied to them, and one plan (name + passes) per student.

With no ``--pipeline`` each ``--ratio R`` gives a student named for what R is a fraction of
(``Ratio.tag``: ``macs50``, ``latency50``, ``macs50p`` for ``--ratio-of prunable``) built by
``[importance.<estimator>,]prune.width{ratio=R},bn.recalibrate[,fidelity{stage=before_distill},distill{epochs=N}]``
(the importance pass only with ``--importance``; otherwise ``prune.width`` picks its estimator);
``--drop-layers N`` /
``--keep-layers N`` add ``prune.depth`` (and a tag ``dN`` / ``kN``). A user pipeline is one student,
or one per ``--ratio`` when it contains ``$ratio``. Every plan then ends with the lowering pass
(``lower.<target>``, unless the pipeline lowers already) and ``record``: the plan is the whole
student, and the manifest's ``pipeline`` is exactly what ran.

Options are strict: a flag that ``--pipeline`` makes moot (``--drop-layers``, ``--keep-layers``,
``--importance``, ``--distill-epochs``, ``--ratio`` without ``$ratio``) is an error, as is any
recipe key the schema does not know (the message names the closest valid key). A recipe's
``train:`` feeds the options of the distillation pass and its ``stages:`` drive
``distill.progressive``; with no pass to feed they are errors, never ignored.

Each ``--ratio`` becomes a ``Ratio`` once (the fraction of the teacher's MACs to remove, or of its
latency where the profile has a measured table: ``prune.width``'s own rule, ``ratio_basis``, which
also names the student), checked once, and reaches ``prune.width`` as a typed option.
``StudentPlanner`` plans each student once, in the steps the driver interleaves with loading the
teacher (see its docstring); ``plan_students`` runs them at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from potstill import recipe as recipe_schema
from potstill.errors import InputError
from potstill.passes.prune.width_options import ratio_basis
from potstill.pipeline import Fact, Pass, build_pipeline, get_pass, needs_fact, predicates
from potstill.recipe import SEED_MAX, Recipe, parse_recipe, read_recipe_file
from potstill.recipe import DataSpec as RecipeData
from potstill.targets.registry import check_target

if TYPE_CHECKING:
    from potstill.passes.prune.width import WidthPrunePass
    from potstill.profiles.schema import DeviceProfile
    from potstill.state import CompileState

RATIO_PLACEHOLDER = "$ratio"
#: the recipe schema (one for compiling and distilling: ``potstill.recipe``), under its names here
CompileRecipe = Recipe
RECIPE_VERSION = recipe_schema.RECIPE_VERSION
#: the distillation epochs of the default pipeline when training data is at hand
DEFAULT_DISTILL_EPOCHS = 3


@dataclass
class CompileOptions:
    """Everything ``potstill compile`` takes; a recipe YAML fills the fields the caller left unset.

    ``None`` means "not given" (never a sentinel zero): the planner can then tell a flag the user
    set from a default and refuse flags that do not apply.
    """

    teacher: str | None = None
    out: str | Path | None = None
    profile: str | None = None
    ratios: tuple[float, ...] = ()
    #: what each ratio is a fraction of: "total" or "prunable" (None: total)
    ratio_of: str | None = None
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
    #: distil default-pipeline students when training data is at hand
    distill: bool = True
    #: epochs of that distillation (None: the default, 3); must be >= 1
    distill_epochs: int | None = None
    #: evaluation data (FILE.py:FN); default: the teacher file's eval_data
    eval_data: str | None = None
    #: plugin modules or files that register passes (imported before planning)
    plugins: tuple[str, ...] = ()
    #: replace an OUT that potstill did not write
    force: bool = False
    #: resume distillation from the work area's checkpoints (None: when the inputs match)
    resume: bool | None = None
    #: refuse a compile whose estimated peak memory exceeds this many bytes (``potstill.inputs.memory``)
    max_memory: int | None = None
    #: tokens per example for text teachers (None: the profile's ``sequence_length``, else 32)
    sequence_length: int | None = None
    #: let a Hugging Face folder with ``auto_map`` run its own code (``--trust-remote-code``)
    trust_remote_code: bool = False
    #: lower and time the teacher so students get speed-ups (``--no-teacher-timing`` skips it)
    teacher_timing: bool = True
    #: show a progress bar with an ETA on stderr
    progress: bool = True
    #: elastic: train one supernet and search students for each profile (``--elastic``)
    elastic: bool = False
    #: elastic: students per profile, spread along the Pareto front (None: 3)
    students: int | None = None
    #: elastic: latency and memory budgets of the search (None: the profile's)
    latency_ms: float | None = None
    memory_mb: float | None = None
    #: elastic: speed-up budgets over the teacher, timed against its engine (one student per budget when several)
    speedups: tuple[float, ...] = ()
    #: elastic: more device profiles (``--profile`` given again), each searched on the same supernet
    extra_profiles: tuple[str, ...] = ()
    #: the validated recipe (``CompileRecipe``) when one was given
    recipe_data: Any = None
    #: the recipe as written (plus its "path"), for the manifest
    extra: dict[str, Any] = field(default_factory=dict)
    #: fidelity floor (0..1) overriding the profile's ``min_fidelity``; students below it are flagged
    min_fidelity: float | None = None
    #: wall-clock budget of each student's default distillation, in minutes (``--train-minutes``)
    train_minutes: float | None = None
    #: augment image training data in the default distillation (``--no-augment`` turns it off)
    augment: bool = True


@dataclass
class Plan:
    """One student to build: its name and the passes that make it."""

    name: str
    passes: list[Pass]
    #: the device profile of this plan when it is not the compilation's (elastic, several devices)
    profile: str | None = None

    @property
    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)


# ---------------------------------------------------------------------------------------------
# Recipes (the schema and its parser: ``potstill.recipe``)


def apply_recipe(opts: CompileOptions) -> CompileOptions:
    """Fill unset options from ``opts.recipe`` (YAML); paths in it are relative to the recipe file."""
    if not opts.recipe:
        return opts
    path = Path(opts.recipe)
    source = f"--recipe '{path}'"
    data = read_recipe_file(path, source)
    recipe = parse_recipe(data, source)
    base = path.parent
    values: dict[str, Any] = {
        "teacher": recipe.teacher, "out": recipe.output, "profile": recipe.profile,
        "pipeline": recipe.pipeline, "calib": recipe.calib, "eval_data": recipe.eval,
        "drop_layers": recipe.drop_layers, "keep_layers": recipe.keep_layers, "importance": recipe.importance,
        "target": recipe.target, "seed": recipe.seed, "name": recipe.name, "distill_epochs": recipe.distill_epochs,
    }  # fmt: skip
    if isinstance(recipe.data, RecipeData):
        values.update(data=recipe.data.train, calib=recipe.data.calib or recipe.calib,
                      eval_data=recipe.data.eval or recipe.eval)  # fmt: skip
    else:
        values["data"] = recipe.data
    if recipe.ratio is not None:
        values["ratios"] = tuple(recipe.ratio) if isinstance(recipe.ratio, list) else (recipe.ratio,)
    if recipe.input_shape is not None:
        shapes = recipe.input_shape
        values["input_shapes"] = tuple(shapes) if isinstance(shapes, list) else (shapes,)
    if recipe.plugins:
        values["plugins"] = tuple(_resolve_recipe_path(p, base) if p.endswith(".py") else p for p in recipe.plugins)
    for key in ("teacher", "data", "calib", "eval_data"):  # the output stays relative to the working folder
        if isinstance(values.get(key), str):
            values[key] = _resolve_recipe_path(values[key], base)
    merged = {}
    for f in fields(opts):
        current = getattr(opts, f.name)
        if (current is None or current == ()) and values.get(f.name) is not None:
            merged[f.name] = values[f.name]
    return replace(opts, **merged, recipe_data=recipe, extra={**data, "path": str(path.resolve())})


def _resolve_recipe_path(value: str, base: Path) -> str:
    if value.startswith("hf:"):
        rest = value[3:]
        return "hf:" + (rest if Path(rest).is_absolute() else str(base / rest))
    file_part, sep, name = value.partition(".py:")
    file_part += ".py" if sep else ""
    resolved = file_part if Path(file_part).is_absolute() else str(base / file_part)
    return f"{resolved}:{name}" if sep else resolved


# ---------------------------------------------------------------------------------------------
# Plans


def _pipeline_items(spec: str | list[Any]) -> list[str | Pass]:
    """A pipeline string, or a recipe list of strings and ``{name: {option: value}}`` mappings."""
    if isinstance(spec, str):
        return [spec]
    items: list[str | Pass] = []
    for item in spec:
        if isinstance(item, str):
            items.append(item)
        elif isinstance(item, dict) and len(item) == 1:
            ((name, opts),) = item.items()
            items.append(get_pass(str(name))(**(opts or {})))
        else:
            raise InputError(f"pipeline entry {item!r}: write 'name{{k=v}}' or a mapping {{name: {{k: v}}}}")
    return items


MIN_RATIO, MAX_RATIO = 0.01, 0.95
#: what a ratio is a fraction of (``prune.width``'s ``ratio_of``)
RATIO_OF = ("total", "prunable")


@dataclass(frozen=True)
class Ratio:
    """One ``--ratio``: the fraction of the teacher's MACs to remove (of its latency, where the
    profile has a measured table: the width pass's ``budget.asked`` says which), counted on the whole
    model (``of="total"``) or on its prunable part (``of="prunable"``: a decoder's pinned embeddings
    and LM head left out). Checked once, when the planner is built; the width pass receives it as
    typed options, never as text.

    >>> Ratio(0.3).tag(), Ratio(0.3, "prunable").tag("latency")
    ('macs30', 'latency30p')
    """

    value: float
    of: str = "total"

    def __post_init__(self) -> None:
        # below 1 % no aligned unit goes and the student would be named macs0; above 95 % no student
        # keeps the teacher's job
        if not MIN_RATIO <= self.value <= MAX_RATIO:
            raise InputError(f"--ratio {self.value}: expected the fraction of the MACs (or latency) to remove, "
                             f"between {MIN_RATIO} and {MAX_RATIO}; e.g. --ratio 0.5 removes about half")  # fmt: skip
        if self.of not in RATIO_OF:
            raise InputError(f"--ratio-of {self.of!r}: expected 'total' or 'prunable'")

    def tag(self, basis: str = "macs") -> str:
        """The student's name: what the ratio is a fraction of (``basis``: ``macs`` or ``latency``, as
        ``prune.width`` budgets it: ``WidthPrunePass.ratio_basis``), the percentage removed, and ``p``
        when it counts the prunable part only: ``macs50``, ``latency30``, ``macs30p``. (Students were
        named ``w50`` before, which said neither.)"""
        return f"{basis}{round(self.value * 100):d}{'p' if self.of == 'prunable' else ''}"

    def width_pass(self) -> WidthPrunePass:
        """``prune.width`` with this ratio."""
        from potstill.passes.prune.width import WidthPrunePass

        return WidthPrunePass(ratio=self.value, ratio_of=self.of)


def check_flags(opts: CompileOptions) -> None:
    """Flags that cannot apply are errors (checked before anything is loaded)."""
    from potstill.passes.elastic.plan import check_elastic_flags

    check_elastic_flags(opts)
    if opts.distill_epochs is not None and opts.distill_epochs < 1:
        raise InputError(f"--distill-epochs {opts.distill_epochs}: must be at least 1; use --no-distill for none")
    if opts.distill_epochs is not None and not opts.distill:
        raise InputError("--distill-epochs with --no-distill: give one of them")
    if opts.min_fidelity is not None and not 0.0 <= float(opts.min_fidelity) <= 1.0:
        raise InputError(f"--min-fidelity {opts.min_fidelity}: must be between 0 and 1 (a fidelity score)")
    if opts.seed is not None and not 0 <= int(opts.seed) <= SEED_MAX:
        raise InputError(f"--seed {opts.seed}: must be between 0 and {SEED_MAX}")
    _check_training_flags(opts)
    if opts.ratio_of is not None and not opts.ratios and not opts.pipeline:
        raise InputError("--ratio-of says what --ratio is a fraction of: give --ratio too")
    if opts.pipeline:
        moot = [flag for flag, value in (
            ("--ratio-of", opts.ratio_of),
            ("--drop-layers", opts.drop_layers), ("--keep-layers", opts.keep_layers),
            ("--importance", opts.importance), ("--distill-epochs", opts.distill_epochs),
        ) if value is not None]  # fmt: skip
        if not opts.distill:
            moot.append("--no-distill")
        if moot:
            raise InputError(
                f"{', '.join(moot)} with --pipeline: the pipeline says what runs; write it there "
                "(prune.depth{drop=N}, importance.NAME, distill{epochs=N}) and drop the flag"
            )


def _check_training_flags(opts: CompileOptions) -> None:
    """``--train-minutes`` and ``--no-augment`` shape the default distillation: without one they are errors."""
    m = opts.train_minutes
    if m is not None and not (math.isfinite(float(m)) and float(m) > 0):
        raise InputError(f"--train-minutes {m}: must be a positive number of minutes (e.g. 10)")
    given = [f for f, on in (("--train-minutes", m is not None), ("--no-augment", not opts.augment)) if on]
    if opts.elastic and opts.distill and not opts.pipeline:  # elastic.train augments and takes a time budget
        given = []
    why = ("--no-distill turns distillation off" if not opts.distill else
           "the pipeline says what runs: write distill{minutes=M} or distill{augment=false} there" if opts.pipeline else
           "the recipe's stages: run distill.progressive, which takes epochs per stage"
           if getattr(opts.recipe_data, "stages", None) else "")  # fmt: skip
    if given and why:
        raise InputError(f"{', '.join(given)}: no default distillation would use it ({why}); drop the flag")


def _depth_steps(opts: CompileOptions) -> tuple[list[Pass], str]:
    if opts.drop_layers is None and opts.keep_layers is None:
        return [], ""
    if opts.drop_layers is not None and opts.keep_layers is not None:
        raise InputError("give --drop-layers or --keep-layers, not both")
    depth = get_pass("prune.depth")
    if opts.drop_layers is not None:
        if opts.drop_layers < 1:
            raise InputError(f"--drop-layers {opts.drop_layers}: must be at least 1")
        step, tag = depth(drop=opts.drop_layers), f"d{opts.drop_layers}"
    else:
        if opts.keep_layers is None or opts.keep_layers < 1:
            raise InputError(f"--keep-layers {opts.keep_layers}: must be at least 1")
        step, tag = depth(keep=opts.keep_layers), f"k{opts.keep_layers}"
    steps = [step]
    if needs_fact(depth, "block_importance"):
        steps.insert(0, get_pass("importance.blocks")())
    return steps, tag


def _feed_training(passes: list[Pass], recipe: Any, source: str) -> list[Pass]:
    """Give the recipe's ``train:`` to the distillation pass and ``stages:`` to ``distill.progressive``."""
    train = dict(getattr(recipe, "train", None) or {})
    stages = list(getattr(recipe, "stages", None) or [])
    if not train and not stages:
        return passes
    names = [p.name for p in passes]
    if stages and "distill.progressive" not in names:
        raise InputError(
            f"{source}: stages: no distill.progressive pass in the pipeline to run them; "
            "add 'distill.progressive' to the pipeline (or remove stages:)"
        )
    target = "distill.progressive" if stages else "distill"
    if train and not any(n in ("distill", "distill.progressive") for n in names):
        raise InputError(f"{source}: train: no distillation pass in the pipeline to use it; give training data "
                         "(--data) for the default pipeline, add distill to --pipeline, or remove train:")
    out = []
    for p in passes:
        if p.name not in ("distill", "distill.progressive") or (p.name != target and not train):
            out.append(p)
            continue
        given = p.given()
        twice = sorted(set(given) & set(train))
        if twice:
            raise InputError(f"{source}: train.{twice[0]} is also set in '{p.spec()}'; give it once")
        extra: dict[str, Any] = dict(train)
        if p.name == "distill.progressive" and stages:
            extra["stages"] = stages
        cls = type(p)
        out.append(cls(**{**given, **extra}))
    return out


def _finish(passes: list[Pass], target: str) -> list[Pass]:
    """Append the lowering pass (unless the pipeline lowers) and ``record``: every plan ends the same."""
    if any(p.name.startswith("record") for p in passes):
        raise InputError("'record' is added to every plan by potstill; remove it from the pipeline")
    if not any(Fact("lowered") in predicates(p.ensures) for p in passes):
        passes = [*passes, get_pass(f"lower.{target}")()]
    return [*passes, get_pass("record")()]


@dataclass
class _Draft:
    """A student planned before the teacher is loaded."""

    name: str
    passes: list[Pass]
    #: "pipeline" (complete), "default" (distillation, lowering and record still to add) or
    #: "elastic" (complete but for elastic.train, added when training data is at hand)
    kind: str
    profile: str | None = None
    #: the ``--ratio`` the name starts with, read by ``width`` (after ``importance.NAME`` when
    #: ``importance`` names it); ``rest``: the name's other tags. Once the teacher is loaded, the
    #: width pass says what the ratio is a fraction of for it, and the name follows
    ratio: Ratio | None = None
    width: WidthPrunePass | None = None
    importance: str | None = None
    rest: tuple[str, ...] = ()

    def named_for(self, state: CompileState) -> str:
        """The name once the teacher of ``state`` is known (``WidthPrunePass.ratio_basis``)."""
        if self.ratio is None or self.width is None:
            return self.name
        basis = self.width.ratio_basis(state, self.importance)
        return "-".join([self.ratio.tag(basis), *self.rest])


class StudentPlanner:
    """Plans the students of one compilation, once, in three steps the driver interleaves with loading:

    1. ``StudentPlanner(opts)`` checks the flags (``check_flags``) and reads each ``--ratio`` into a
       ``Ratio`` — before anything is loaded;
    2. ``draft(target, profile)`` builds every pass that does not depend on the teacher, so a bad
       pipeline, option or target fails before a large teacher loads, and names the students (the
       profile says what a ratio is a fraction of: ``Ratio.tag``);
    3. ``plans(distill_epochs=, distill=)`` adds what the teacher decides: the default pipeline's
       distillation (the step the driver chose for the teacher's task) with the recipe's ``train:``
       and ``stages:``, ``elastic.train`` for a supernet, and every plan's lowering and ``record``.

    The width pass is built from the ``Ratio`` (``Ratio.width_pass``), never from pipeline text; only
    a user's ``--pipeline`` with ``$ratio`` is text, the user's own.
    """

    def __init__(self, opts: CompileOptions) -> None:
        check_flags(opts)
        self.opts = opts
        self.ratios = tuple(Ratio(float(r), opts.ratio_of or "total") for r in opts.ratios)
        self.source = f"--recipe '{opts.recipe}'" if opts.recipe else "recipe"
        self._drafts: list[_Draft] | None = None
        self._target = ""
        self._profile: DeviceProfile | None = None

    def draft(self, target: str, profile: DeviceProfile | None = None) -> None:
        """Step 2: build the passes that do not depend on the teacher (see the class docstring).
        ``profile`` is the compilation's (None: ``--profile``, else the default, loaded here)."""
        from potstill.profiles import DEFAULT_PROFILE, load_profile

        check_target(target, "--target")
        opts = self.opts
        self._profile = profile if profile is not None else load_profile(opts.profile or DEFAULT_PROFILE)
        if opts.elastic:
            drafts = self._elastic_drafts(target)
        elif opts.pipeline:
            drafts = [replace(d, passes=_finish(_feed_training(d.passes, opts.recipe_data, self.source), target))
                      for d in self._pipeline_students(opts.pipeline)]  # fmt: skip
        else:
            drafts = self._default_drafts()
        names = [d.name for d in drafts]
        if len(set(names)) != len(names):
            raise InputError(f"two students would share a name ({names}); give distinct --ratio values")
        self._drafts, self._target = drafts, target

    def plans(self, distill_epochs: int | None = None, distill: str | None = None,
              state: CompileState | None = None) -> list[Plan]:  # fmt: skip
        """Step 3: every student's whole plan. ``distill`` is the ``distill{...}`` step the driver chose
        for the teacher's task (``potstill.passes.distill.defaults``), ``distill_epochs`` the epochs
        (then ``distill{epochs=N}`` when ``distill`` is None); both None when no training runs.
        ``state`` holds the loaded teacher: a student named by its ratio is renamed by what its width
        pass will budget on this teacher (``macs10`` becomes ``latency10`` where the host-timed
        latency search allocates a transformer's heads and neurons)."""
        if self._drafts is None:
            raise RuntimeError("StudentPlanner.plans() runs once, after draft()")
        drafts, self._drafts = self._drafts, None
        if state is not None:
            drafts = [replace(d, name=d.named_for(state)) for d in drafts]
        plans = []
        for d in drafts:
            passes = d.passes
            if d.kind == "default":
                passes = _feed_training([*passes, *self._distillation(distill_epochs, distill)],
                                        self.opts.recipe_data, self.source)  # fmt: skip
                passes = _finish(passes, self._target)
            elif d.kind == "elastic" and distill_epochs is not None:
                from potstill.passes.elastic.plan import train_pass

                # no --distill-epochs: elastic.train's own step budget
                at = next(i for i, p in enumerate(passes) if p.name == "elastic.nest") + 1
                passes = [*passes[:at], train_pass(self.opts.distill_epochs or 0, self.opts.augment, self.opts.train_minutes), *passes[at:]]
            plans.append(Plan(d.name, passes, d.profile))
        return plans

    def _pipeline_students(self, pipeline: str | list[Any]) -> list[_Draft]:
        text = pipeline if isinstance(pipeline, str) else None
        if self.ratios and (text is None or RATIO_PLACEHOLDER not in text):
            raise InputError(
                "--ratio with --pipeline: write the ratio into the pipeline (prune.width{ratio=0.5}) "
                f"or use '{RATIO_PLACEHOLDER}' there to build one student per --ratio"
            )
        if text is not None and RATIO_PLACEHOLDER in text:
            if not self.ratios:
                raise InputError(f"the pipeline uses '{RATIO_PLACEHOLDER}': give --ratio")
            return [self._pipeline_draft(r, build_pipeline(text.replace(RATIO_PLACEHOLDER, f"{r.value:g}")))
                    for r in self.ratios]  # fmt: skip
        passes = build_pipeline(_pipeline_items(pipeline))
        if not passes:
            raise InputError("--pipeline is empty: name at least one pass (see 'potstill passes')")
        return [_Draft(self.opts.name or "student", passes, "pipeline")]

    def _pipeline_draft(self, r: Ratio, passes: list[Pass]) -> _Draft:
        """A ``$ratio`` student: named by the ratio's tag when ``prune.width{ratio=$ratio}`` reads it
        (with that pass's ``ratio_of``; renamed for the teacher when that pass runs first), else
        ``ratio50``: the pipeline alone says what it is of."""
        from potstill.passes.prune.width import WidthPrunePass

        for i, p in enumerate(passes):
            ratio, of = (getattr(p.options, k, None) for k in ("ratio", "ratio_of"))
            if p.name == "prune.width" and ratio is not None and math.isclose(ratio, r.value, rel_tol=1e-5):
                tagged = Ratio(r.value, of or "total")
                first = isinstance(p, WidthPrunePass) and i == 0
                return _Draft(tagged.tag(ratio_basis(self._profile)), passes, "pipeline", ratio=tagged,
                              width=p if first else None)  # fmt: skip
        return _Draft(f"ratio{round(r.value * 100):d}", passes, "pipeline")

    def _default_drafts(self) -> list[_Draft]:
        """``[prune.depth,][importance.E,]prune.width{ratio=R},bn.recalibrate`` per ratio."""
        opts = self.opts
        depth, depth_tag = _depth_steps(opts)
        ratios: list[Ratio | None] = list(self.ratios) or ([None] if depth else [Ratio(0.5)])
        # no --importance: prune.width chooses (importance=auto, Kwon's mask Fisher when data exists)
        importance = opts.importance
        if importance is not None and "." not in importance:
            importance = f"importance.{importance}"
        estimator = importance.split("{")[0].removeprefix("importance.") if importance else None
        drafts = []
        for r in ratios:
            passes = list(depth)
            rest = (depth_tag,) if depth_tag else ()
            if r is None:
                drafts.append(_Draft("-".join(rest), [*passes, get_pass("bn.recalibrate")()], "default"))
                continue
            width = r.width_pass()
            passes += [*(build_pipeline(importance) if importance else []), width]
            passes.append(get_pass("bn.recalibrate")())  # BN statistics of the pruned widths (a no-op without BN)
            name = "-".join([r.tag(ratio_basis(self._profile)), *rest])
            drafts.append(_Draft(name, passes, "default", ratio=r, width=width, importance=estimator, rest=rest))
        return drafts

    def _distillation(self, distill_epochs: int | None, distill: str | None) -> list[Pass]:
        """The default pipeline's repair: ``fidelity{stage=before_distill}`` then the distillation."""
        stages = bool(getattr(self.opts.recipe_data, "stages", None))
        if not (stages or distill_epochs is not None or distill is not None):
            return []
        steps = [get_pass("fidelity")(stage="before_distill")]
        if stages:
            steps.append(get_pass("distill.progressive")())
        elif distill is not None:
            steps += build_pipeline(distill)
        else:
            steps.append(get_pass("distill")(epochs=distill_epochs))
        return steps

    def _elastic_drafts(self, target: str) -> list[_Draft]:
        """One plan per profile sharing one supernet (see ``potstill.passes.elastic.plan``)."""
        from potstill.passes.elastic.plan import elastic_pipelines
        from potstill.profiles import DEFAULT_PROFILE, load_profile

        opts = self.opts
        profiles = [opts.profile or DEFAULT_PROFILE, *opts.extra_profiles]
        drafts = []
        for name, profile, spec in elastic_pipelines(profiles, students=opts.students, latency_ms=opts.latency_ms,
                                                     speedups=opts.speedups, memory_mb=opts.memory_mb,
                                                     train_epochs=None, importance=opts.importance):  # fmt: skip
            own = None if profile == profiles[0] else profile
            lower_target = target if own is None else (opts.target or load_profile(profile).target)
            drafts.append(_Draft(name, _finish(build_pipeline(spec), lower_target), "elastic", own))
        return drafts


def plan_students(opts: CompileOptions, target: str, distill_epochs: int | None = None,
                  distill: str | None = None, profile: DeviceProfile | None = None) -> list[Plan]:  # fmt: skip
    """One plan per student in one call (``StudentPlanner``'s three steps): the user's pipeline, or
    the default prune pipeline per ratio, each ending in lowering and ``record``.

    With ``distill`` (a ``distill{...}`` step) or ``distill_epochs`` (then ``distill{epochs=N}``) the
    default pipeline distils each pruned student from the teacher before lowering. ``profile`` names
    the students (None: ``opts.profile``, else the default profile).
    """
    planner = StudentPlanner(opts)
    planner.draft(target, profile)
    return planner.plans(distill_epochs=distill_epochs, distill=distill)


def teacher_plan(target: str, *, timing: bool = True) -> Plan:
    """The teacher's own pipeline: lower it like the students (unless ``timing`` is off) and record it."""
    return Plan("teacher", [get_pass("record.teacher")(target=target, timing=timing)])
