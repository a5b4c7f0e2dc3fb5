"""The recipe schema (version 1): one YAML file that holds what the flags say, plus training.

```yaml
version: 1
teacher: models.py:make_teacher
data: {train: data.py:train, eval: data.py:test}      # or one FILE.py:FN, the training data
profile: cpu
ratio: [0.25, 0.5]
pipeline: "prune.width{ratio=$ratio},distill.progressive"
train: {lr: 0.001}                                     # options of the distillation pass
stages:
  - {name: general, method: hidden, data: data.py:general, epochs: 1}
  - {name: task, method: hidden+kd, options: {alpha: 0.5}, teacher: models.py:finetuned}
```

``potstill compile --recipe`` (``plan.apply_recipe``) and the distillation stages
(``passes.distill.recipe.build_stages``) read this one schema with this one parser. It is strict:
a key it does not know is an error naming the closest valid key and listing all of them, at every
level (top, ``data``, each stage), and every other error names the field by its path
(``stages.1.method``). A stage names its objective with ``method`` and its ``options`` exactly as
``distill{method=...}`` does (``passes.distill.methods``): one vocabulary, checked the same way.
``train:`` is checked against the options of the distillation pass it feeds, when the plan is made.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from potstill.errors import InputError
from potstill.passes.distill import methods
from potstill.passes.distill.trainer import TrainConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

RECIPE_VERSION = 1
SEED_MAX = 2**32 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: keys that were renamed: old -> new (an error that says so, rather than "unknown key")
    renamed: ClassVar[dict[str, str]] = {}


class DataSpec(_Strict):
    """``data:`` as a mapping: training, evaluation and calibration data (``FILE.py:FN`` each)."""

    train: str | None = None
    eval: str | None = None
    calib: str | None = None


def _check_train_keys(v: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(v) - known)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; known: {', '.join(sorted(known))}")
    return v


class StageSpec(_Strict):
    """One stage of progressive distillation (``distill.progressive``)."""

    renamed: ClassVar[dict[str, str]] = {"loss": "method", "loss_options": "options"}
    name: str
    method: str = "kd"
    options: dict[str, Any] = Field(default_factory=dict)
    teacher: str | None = None
    data: str | None = None
    epochs: int | None = Field(default=None, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    #: the stage's trainer settings (``TrainConfig`` fields)
    train: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _method_and_options(self) -> StageSpec:
        try:
            methods.build(self.method, self.options)
        except InputError as e:
            raise ValueError(str(e)) from None
        return self

    @field_validator("train")
    @classmethod
    def _known_train(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_train_keys(v)


class Recipe(_Strict):
    """A recipe: the settings of ``potstill compile`` (same names as the flags), ``train:`` and ``stages:``."""

    version: Literal[1]
    teacher: str | None = None
    output: str | None = None
    profile: str | None = None
    ratio: float | list[float] | None = None
    input_shape: str | list[str] | None = None
    pipeline: str | list[str | dict[str, dict[str, Any] | None]] | None = None
    data: str | DataSpec | None = None
    calib: str | None = None
    eval: str | None = None
    drop_layers: int | None = Field(default=None, ge=1)
    keep_layers: int | None = Field(default=None, ge=1)
    importance: str | None = None
    #: a registered target (``potstill.targets.registry``), checked once plugins are loaded
    target: str | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    name: str | None = None
    distill_epochs: int | None = Field(default=None, ge=1)
    plugins: list[str] = Field(default_factory=list)
    #: options of the distillation pass (``distill`` or ``distill.progressive``), checked against it
    train: dict[str, Any] = Field(default_factory=dict)
    #: progressive distillation stages
    stages: list[StageSpec] = Field(default_factory=list)


def _closest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_keys(source: str, path: str, given: dict[str, Any], model: type[_Strict]) -> None:
    """Every key of ``given`` is a field of ``model``; else an InputError naming the closest one
    and listing them all (``path`` is where ``given`` sits in the recipe, "" at the top)."""
    valid = sorted(model.model_fields)
    for key in given:
        where = f"{source}: {path}.{key}" if path else f"{source}: {key}"
        if str(key) in model.renamed:
            raise InputError(f"{where}: '{key}' is now '{model.renamed[str(key)]}' (one vocabulary with "
                             "distill{method=...}); rename it")  # fmt: skip
        if str(key) not in valid:
            raise InputError(f"{where}: unknown key '{key}'{_closest(str(key), valid)}; valid keys: {', '.join(valid)}")


def _format(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"{source}: {loc}: {err['msg']}{got}")
    return "\n".join(lines)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping; an error names the field by its path and the fix.

    >>> parse_recipe({"version": 1, "ratio": 0.5}, "r.yaml").ratio
    0.5
    """
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping of settings (version: 1, teacher:, pipeline:, ...)")
    if "version" not in data:
        raise InputError(f"{source}: version: missing; add 'version: {RECIPE_VERSION}' (the schema this potstill reads)")
    if data["version"] != RECIPE_VERSION:
        raise InputError(f"{source}: version: {data['version']!r} is not supported (this potstill reads {RECIPE_VERSION})")
    check_keys(source, "", data, Recipe)
    if isinstance(data.get("data"), dict):
        check_keys(source, "data", data["data"], DataSpec)
    for i, stage in enumerate(data.get("stages") or []):
        if isinstance(stage, dict):
            check_keys(source, f"stages.{i}", stage, StageSpec)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise InputError(_format(e, source)) from e


def read_recipe_file(path: str | Path, source: str | None = None) -> Any:
    """The YAML of a recipe file (not yet validated); ``source`` names it in errors."""
    path = Path(path)
    source = source or str(path)
    if not path.is_file():
        raise InputError(f"{source}: no such file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not valid YAML: {e}") from e


def load_recipe(path: str | Path, source: str | None = None) -> Recipe:
    """Read and validate a recipe file."""
    return parse_recipe(read_recipe_file(path, source), source or str(path))
