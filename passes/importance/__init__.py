"""Importance estimators: one score per prunable unit of every coupled group (higher = keep).

One vocabulary: each estimator is ONE frozen-dataclass class whose fields are its options; the same
class is the pass ``importance.<name>`` and the estimator ``prune.width{importance=<name>}`` builds.
Width estimators: magnitude, taylor, fisher, activation, obs; depth: ``importance.blocks``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from potstill.errors import InputError

from .base import (
    DEFAULT_CALIB_BATCHES,
    ImportanceEstimator,
    aggregate,
    calibration_batches,
    run_estimator,
    write_importance,
)

#: width estimator name -> module defining it (imported on first use)
WIDTH_ESTIMATORS: dict[str, str] = {
    "magnitude": "potstill.passes.importance.magnitude",
    "taylor": "potstill.passes.importance.taylor",
    "fisher": "potstill.passes.importance.fisher",
    "activation": "potstill.passes.importance.activation",
    "obs": "potstill.passes.importance.obs",
}


def estimator_class(name: str) -> type[ImportanceEstimator]:
    """The estimator class named ``name`` (an InputError listing the names otherwise)."""
    if name not in WIDTH_ESTIMATORS:
        raise InputError(f"unknown importance '{name}'; choose one of {', '.join(WIDTH_ESTIMATORS)}")
    module = importlib.import_module(WIDTH_ESTIMATORS[name])
    found = [c for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, ImportanceEstimator) and c.name == name]
    return found[0]


def get_estimator(name: str, **options: Any) -> ImportanceEstimator:
    """A width estimator by name; options it does not take (e.g. ``batches`` for magnitude) are
    left out only when they are the caller's defaults, see ``prune.width``."""
    cls = estimator_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in fields})


__all__ = [
    "DEFAULT_CALIB_BATCHES",
    "WIDTH_ESTIMATORS",
    "ImportanceEstimator",
    "aggregate",
    "calibration_batches",
    "estimator_class",
    "get_estimator",
    "run_estimator",
    "write_importance",
]
