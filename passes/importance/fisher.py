"""Fisher importance: the diagonal empirical Fisher information of a unit's weights.

    F_i = E_batches[ (dL/dw_i)^2 ],        s_m(u) = sum_{i in slice_m(u)} F_i

aggregated over the group's members (mean-normalised sum, ``base.aggregate``). The Fisher
diagonal as a parameter-importance measure is the one PSMT uses to select parameters
(arXiv 2407.02253; after Kirkpatrick et al., EWC, 2017). With no targets the loss is the
sampled-target self-distillation loss of ``gradients.py``, which makes this the true Fisher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from potstill.pipeline import register_pass

from .base import DEFAULT_CALIB_BATCHES, ImportanceEstimator, ImportancePass
from .taylor import GradientImportance


class FisherImportance(GradientImportance):
    """Mean squared gradient summed over each unit's weights."""

    name: ClassVar[str] = "fisher"
    statistic: ClassVar[str] = "fisher"


@dataclass(frozen=True)
class FisherOptions:
    batches: int = DEFAULT_CALIB_BATCHES
    normalize: bool = True


@register_pass
class FisherImportancePass(ImportancePass):
    """``importance.fisher{batches=8}``: diagonal Fisher scores on calibration batches."""

    name: ClassVar[str] = "importance.fisher"
    Options: ClassVar[type] = FisherOptions

    def estimator(self) -> ImportanceEstimator:
        return FisherImportance(self.options.normalize, self.options.batches)
