"""Distillation recipes in YAML: the teacher, the data, the pipeline and the stages of a run.

```yaml
version: 1
teacher: models.py:make_teacher
data: {train: data.py:train, eval: data.py:test}
pipeline: "prune.width{ratio=0.5},distill{method=kd,epochs=3}"
train: {lr: 0.001, batch_size: 64}
stages:
  - {name: general, method: hidden, data: data.py:general, epochs: 1}
  - {name: task, method: hidden+kd, options: {alpha: 0.5}, teacher: models.py:finetuned}
```

The schema is versioned (``version: 1``); unknown fields are errors, and every error names the
field by its path (``stages.1.method``). A stage names its objective with ``method`` and its
``options`` exactly as ``distill{method=...}`` does (``methods``): one vocabulary, checked the same
way. ``build_stages`` turns stages into ``progressive.Stage``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from potstill.errors import InputError
from potstill.inputs.data import load_callable
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import methods
from .config import TrainConfig
from .progressive import Stage

RECIPE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
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
    name: str
    method: str = "kd"
    options: dict[str, Any] = Field(default_factory=dict)
    teacher: str | None = None
    data: str | None = None
    epochs: int | None = Field(default=None, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    train: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for old, new in (("loss", "method"), ("loss_options", "options")):
                if old in v:
                    raise ValueError(f"'{old}' is now '{new}' (one vocabulary with distill{{method=...}}); rename it")
        return v

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
    version: Literal[1]
    teacher: str | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    pipeline: str | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    stages: list[StageSpec] = Field(default_factory=list)

    @field_validator("train")
    @classmethod
    def _known_train(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_train_keys(v)


def _format(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{source}: {loc}: {err['msg']}")
    return "\n".join(lines)


def parse_recipe(obj: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe dict; an error names every bad field by its path."""
    if not isinstance(obj, dict):
        raise InputError(f"{source}: a recipe is a mapping with version, teacher, data, pipeline, stages")
    if "version" not in obj:
        raise InputError(f"{source}: version: missing (this potstill reads version {RECIPE_VERSION})")
    if obj["version"] != RECIPE_VERSION:
        raise InputError(f"{source}: version: {obj['version']!r} is not supported (expected {RECIPE_VERSION})")
    try:
        return Recipe.model_validate(obj)
    except ValidationError as e:
        raise InputError(_format(e, source)) from e


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from e
    return parse_recipe(obj, str(path))


def build_stages(recipe: Recipe, loader: Callable[[str], Callable[..., Any]] = load_callable) -> list[Stage]:
    """``progressive.Stage`` objects; teachers are built by calling the named factories."""
    stages = []
    for spec in recipe.stages:
        train = dict(spec.train)
        for key in ("epochs", "max_steps", "lr"):
            value = getattr(spec, key)
            if value is not None:
                train[key] = value
        teacher = loader(spec.teacher)() if spec.teacher else None
        data = loader(spec.data) if spec.data else None
        built = methods.build(spec.method, spec.options)
        # the losses' own keyword names; every part takes only its own (no name is shared across parts)
        kwargs = {k: v for part, opts in built.items() for k, v in methods.loss_kwargs(part, opts).items()}
        stages.append(Stage(spec.name, spec.method, kwargs, teacher, data, train))
    return stages
