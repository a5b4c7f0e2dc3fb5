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
    ESTIMATORS,
    ImportanceEstimator,
    aggregate,
    calibration_batches,
    run_estimator,
    write_importance,
)

#: the built-in width estimators: name -> module defining it (imported on first use); a plugin
#: estimator registers itself with ``@estimator`` and is found by name the same way
BUILTIN_ESTIMATORS: dict[str, str] = {
    "magnitude": "potstill.passes.importance.magnitude",
    "taylor": "potstill.passes.importance.taylor",
    "fisher": "potstill.passes.importance.fisher",
    "activation": "potstill.passes.importance.activation",
    "obs": "potstill.passes.importance.obs",
}
#: kept for callers of the old name
WIDTH_ESTIMATORS = BUILTIN_ESTIMATORS


def estimator_names() -> list[str]:
    """Every width estimator a pipeline can name: the built-ins and the registered plugins."""
    return [*BUILTIN_ESTIMATORS, *(n for n in ESTIMATORS if n not in BUILTIN_ESTIMATORS)]


def estimator_class(name: str) -> type[ImportanceEstimator]:
    """The estimator class named ``name`` (an InputError listing the names otherwise)."""
    if name in BUILTIN_ESTIMATORS and name not in ESTIMATORS:
        importlib.import_module(BUILTIN_ESTIMATORS[name])
    if name not in ESTIMATORS:
        raise InputError(f"unknown importance '{name}'; choose one of {', '.join(estimator_names())}")
    return ESTIMATORS[name]


def get_estimator(name: str, **options: Any) -> ImportanceEstimator:
    """A width estimator by name; options it does not take (e.g. ``batches`` for magnitude) are
    left out only when they are the caller's defaults, see ``prune.width``."""
    cls = estimator_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in fields})


__all__ = [
    "BUILTIN_ESTIMATORS",
    "DEFAULT_CALIB_BATCHES",
    "ESTIMATORS",
    "WIDTH_ESTIMATORS",
    "ImportanceEstimator",
    "aggregate",
    "calibration_batches",
    "estimator_class",
    "estimator_names",
    "get_estimator",
    "run_estimator",
    "write_importance",
]
