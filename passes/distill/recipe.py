"""Distillation stages from a recipe: ``build_stages`` turns a recipe's ``stages:`` into
``progressive.Stage`` objects.

```yaml
version: 1
teacher: models.py:make_teacher
data: {train: data.py:train, eval: data.py:test}
pipeline: "prune.width{ratio=0.5},distill.progressive"
stages:
  - {name: general, method: hidden, data: data.py:general, epochs: 1}
  - {name: task, method: hidden+kd, options: {alpha: 0.5}, teacher: models.py:finetuned}
```

The recipe schema and its parser are ``potstill.recipe`` (one schema for compiling and distilling,
version 1); ``Recipe``, ``StageSpec``, ``DataSpec``, ``parse_recipe`` and ``load_recipe`` are
re-exported here. A stage names its objective with ``method`` and its ``options`` exactly as
``distill{method=...}`` does (``methods``): one vocabulary, checked the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from potstill.inputs.data import load_callable
from potstill.recipe import RECIPE_VERSION, DataSpec, Recipe, StageSpec, load_recipe, parse_recipe

from . import methods
from .progressive import Stage

__all__ = ["RECIPE_VERSION", "DataSpec", "Recipe", "StageSpec", "build_stages", "load_recipe", "parse_recipe"]


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
