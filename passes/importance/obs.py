"""Optimal-Brain-Surgeon importance: the output error of dropping a unit when the rest is refitted.

For a linear consumer ``y = W x`` of a group (FFN down projection, attention output projection,
inverted-residual projection) with input Gram ``G = sum x~ x~^T`` over calibration tokens
(``x~ = [x; 1]``, ridge ``lambda`` on the diagonal), removing the input columns ``U`` of one unit
and refitting all other columns by least squares raises the output error by

    dE_U = tr( W_U  [(G^-1)_UU]^-1  W_U^T )

(OBS, Hassibi & Stork 1993; structured form as in ZipLM, Kurtic et al. 2023). It is the criterion
that matches ``prune.width{reconstruct=true}``: it keeps units whose contribution the remaining
ones cannot take over. Groups without such a consumer (hidden size, conv channels feeding 3x3
convs) fall back to Minitron activation importance.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from potstill.errors import InputError
from potstill.state import CompileState
from torch import nn

from .activation import ActivationImportance
from .base import DEFAULT_CALIB_BATCHES, ImportanceEstimator, estimator, resolve

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis


@estimator
@dataclass(frozen=True)
class OBSImportance(ImportanceEstimator):
    """``importance.obs{batches=8}``: ``dE_U`` summed over a group's linear consumers (module docstring)."""

    name: ClassVar[str] = "obs"

    batches: int = DEFAULT_CALIB_BATCHES
    #: ridge on the Gram diagonal, relative to its mean
    ridge: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ridge > 0:
            raise InputError(f"importance.obs: ridge must be > 0, not {self.ridge!r}")

    def scores(
        self,
        target: CompileState | nn.Module,
        analysis: Analysis,
        batches: Iterable[Any] | None = None,
    ) -> dict[int, np.ndarray]:
        from potstill.passes.prune.reconstruct import collect_grams, consumers

        model, _, _ = resolve(target)
        data = self.batches_for(target, batches, self.batches)
        groups = analysis.prunable()
        targets = consumers(model, analysis, [g.id for g in groups])
        grams = collect_grams(model, targets, data) if targets else {}
        out = ActivationImportance(batches=self.batches).scores(model, analysis, data)
        by_group: dict[int, np.ndarray] = {}
        for name, gid in targets.items():
            g = analysis.groups[gid]
            member = next(m for m in g.members if m.module == name and m.role == "in")
            gram = grams[name]
            lam = self.ridge * float(torch.diagonal(gram).mean())
            inv = torch.linalg.inv(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype))
            weight: torch.Tensor = model.get_submodule(name).weight  # type: ignore[assignment]
            w = weight.detach().double().reshape(weight.shape[0], -1)
            s = np.zeros(g.n_units)
            for u in range(g.n_units):
                idx = torch.tensor(g.positions(member, [u]), dtype=torch.long)
                w_u = w[:, idx]
                block = inv[idx][:, idx]
                s[u] = float(torch.trace(w_u @ torch.linalg.solve(block, w_u.T)))
            by_group[gid] = by_group.get(gid, 0) + s
        out.update(by_group)
        return out
