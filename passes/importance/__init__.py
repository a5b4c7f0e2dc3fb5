"""Importance estimators: one score per prunable unit of every coupled group (higher = keep).

One module per estimator, each also a pass: ``importance.magnitude``, ``importance.taylor``,
``importance.fisher``, ``importance.activation`` (width) and ``importance.blocks`` (depth).
``get_estimator(name)`` builds a width estimator by name for ``prune.width{importance=NAME}``.
"""

from __future__ import annotations

from potstill.errors import InputError

from .base import DEFAULT_CALIB_BATCHES, ImportanceEstimator, aggregate, calibration_batches, write_importance

WIDTH_ESTIMATORS = ("magnitude", "l1", "l2", "taylor", "fisher", "activation", "obs")


def get_estimator(name: str, batches: int = DEFAULT_CALIB_BATCHES) -> ImportanceEstimator:
    """A width estimator by name: magnitude (= l2), l1, taylor, fisher, activation, obs."""
    if name in ("magnitude", "l2", "l1"):
        from .magnitude import MagnitudeImportance

        return MagnitudeImportance(p=1 if name == "l1" else 2)
    if name == "taylor":
        from .taylor import TaylorImportance

        return TaylorImportance(batches=batches)
    if name == "fisher":
        from .fisher import FisherImportance

        return FisherImportance(batches=batches)
    if name == "activation":
        from .activation import ActivationImportance

        return ActivationImportance(batches=batches)
    if name == "obs":
        from .obs import OBSImportance

        return OBSImportance(batches=batches)
    raise InputError(f"unknown importance '{name}'; choose one of {', '.join(WIDTH_ESTIMATORS)}")


__all__ = [
    "DEFAULT_CALIB_BATCHES",
    "WIDTH_ESTIMATORS",
    "ImportanceEstimator",
    "aggregate",
    "calibration_batches",
    "get_estimator",
    "write_importance",
]
