"""The importance interface: one score per prunable unit of every coupled group.

An :class:`ImportanceEstimator` maps a model, its :class:`~potstill.ir.capture.Analysis` and calibration
batches to ``{group_id: scores}``, one float per unit (channel, neuron, head, KV group, ...),
higher = keep. Estimators first score every *member* of a group (a parameter slice or an
activation site) and then aggregate over the members:

    s_g(u) = sum_m  s_m(u) / mean_u' s_m(u')        (``normalize=True``, the default)
    s_g(u) = sum_m  s_m(u)                           (``normalize=False``)

Normalising by the member's mean makes every member count equally whatever its scale (a BN
weight next to a 3x3 conv weight), as Torch-Pruning's ``group_reduction="mean"`` with
``normalizer="mean"`` does; it never changes the ranking inside one member.

Calibration data comes from ``state.calib_data`` (the CLI's ``--calib FILE.py:FN`` or a Hugging
Face tokenizer + text). Only if none is given are random inputs shaped like the example inputs
used, with a printed warning: random token ids or pixels say little about what a model relies on.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from potstill.errors import InputError
from potstill.inputs.data import Batch, as_batch, iter_batches
from potstill.pipeline import Pass, PassResult, register_pass
from potstill.state import CompileState
from torch import nn

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis, CoupledGroup, Member

#: how many calibration batches an estimator reads by default
DEFAULT_CALIB_BATCHES = 8


def warn(message: str) -> None:
    """Print a warning on the console (stderr), the way the CLI prints them."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold yellow]warning:[/] {message}")


# ---------------------------------------------------------------------------------------------
# Calibration data


def _random_like(x: Any, model: nn.Module, gen: torch.Generator) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_floating_point():
        return torch.randn(x.shape, generator=gen, dtype=x.dtype)
    if x.dtype == torch.bool:
        return torch.ones_like(x)
    hi = int(x.max().item()) + 1 if x.numel() else 2
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and hi > 2:
        hi = vocab
    if hi <= 2:  # masks and token-type ids: keep them as given
        return x.clone()
    return torch.randint(0, hi, x.shape, generator=gen, dtype=x.dtype)


def random_batches(state: CompileState, model: nn.Module, limit: int) -> list[Batch]:
    """Random inputs shaped like the example inputs (the last resort; scores will be poor)."""
    gen = torch.Generator().manual_seed(state.seed)
    return [
        Batch(
            tuple(_random_like(x, model, gen) for x in state.example_inputs),
            {k: _random_like(v, model, gen) for k, v in state.example_kwargs.items()},
        )
        for _ in range(limit)
    ]


def calibration_batches(state: CompileState, limit: int = DEFAULT_CALIB_BATCHES) -> list[Batch]:
    """Up to ``limit`` calibration batches: ``state.calib_data``, else random with a warning.

    The batches are cached in ``state.records`` so that several estimators see the same data.
    """
    key = f"_calib_batches_{limit}"
    cached = state.records.get(key)
    if cached is not None:
        return list(cached)
    if state.calib_data is not None:
        batches = list(iter_batches(state.calib_data, limit))
        if not batches:
            warn("the calibration data function yielded no batches; using random inputs")
    else:
        batches = []
    if not batches:
        warn(
            "no calibration data given (--calib FILE.py:FN, or a tokenizer and text for Hugging Face "
            "models): importance is computed on random inputs shaped like the example inputs, and "
            "the scores will be poor"
        )
        batches = random_batches(state, state.working().module, limit)
    state.records[key] = list(batches)
    return batches


# ---------------------------------------------------------------------------------------------
# Members -> units


def unit_positions(group: CoupledGroup, member: Member) -> list[list[int]]:
    """The indices along ``member.dim`` that each unit of ``group`` covers in ``member``."""
    return [list(group.positions(member, [u])) for u in range(group.n_units)]


def per_unit(group: CoupledGroup, member: Member, per_index: np.ndarray, reduce: str = "sum") -> np.ndarray:
    """Reduce a per-index statistic (along ``member.dim``) to one value per unit."""
    out = np.zeros(group.n_units, dtype=np.float64)
    for u, pos in enumerate(unit_positions(group, member)):
        vals = per_index[pos]
        out[u] = float(vals.sum()) if reduce == "sum" else float(np.sqrt((vals**2).sum()))
    return out


def per_index_reduce(t: torch.Tensor, dim: int, fn: str) -> np.ndarray:
    """``t`` reduced over every dim but ``dim``: ``fn`` is ``abs`` (sum |t|), ``sq`` (sum t^2)."""
    flat = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1).double()
    if fn == "abs":
        return flat.abs().sum(1).cpu().numpy()
    if fn == "sq":
        return (flat * flat).sum(1).cpu().numpy()
    raise ValueError(f"unknown reduction {fn!r}")


def aggregate(member_scores: Sequence[np.ndarray], n_units: int, normalize: bool = True) -> np.ndarray:
    """Combine member scores into the group score (see the module docstring)."""
    total = np.zeros(n_units, dtype=np.float64)
    for s in member_scores:
        s = np.asarray(s, dtype=np.float64)
        if normalize:
            mean = float(s.mean())
            s = s / mean if mean > 0 and math.isfinite(mean) else np.zeros_like(s)
        total += s
    return total


def parameter_members(
    model: nn.Module, group: CoupledGroup
) -> list[tuple[Member, nn.Parameter]]:
    """The members of ``group`` that are trainable parameters (buffers such as BN statistics are
    skipped), each parameter slice once even when weights are tied."""
    tensors = model.state_dict(keep_vars=True)
    seen: set[tuple[int, int, int, int]] = set()
    found = []
    for m in group.members:
        t = tensors.get(m.param)
        if not isinstance(t, nn.Parameter):
            continue
        key = (id(t), m.dim, m.offset, m.unit_len)
        if key in seen:
            continue
        seen.add(key)
        found.append((m, t))
    return found


# ---------------------------------------------------------------------------------------------
# The interface


def resolve(target: CompileState | nn.Module) -> tuple[nn.Module, nn.Module | None, CompileState | None]:
    """(model to score, teacher or None, state or None) from a state or a bare module."""
    if isinstance(target, CompileState):
        return target.working().module, target.teacher, target
    return target, None, None


@dataclass(frozen=True)
class ImportanceEstimator(ABC):
    """Scores the units of every prunable coupled group; higher = keep.

    An estimator is ONE class: its dataclass fields are its options, the ``importance.<name>`` pass
    is generated from it by :func:`estimator` (the options of that pass *are* the estimator), and
    ``prune.width{importance=<name>}`` builds the same class. Example::

        from potstill.ir.capture import analyze
        a = analyze(model, (x,))
        scores = MagnitudeImportance(p=2).scores(model, a, [x])
        scores[a.prunable()[0].id]        # np.ndarray, one score per unit
    """

    #: short name: ``importance.<name>`` and ``prune.width{importance=<name>}``
    name: ClassVar[str] = ""
    #: True when scores of different groups are on one scale (a loss or output change), so a
    #: global allocation may compare them raw; False: they are mean-normalised per group first
    comparable: ClassVar[bool] = False
    #: True when the estimator reads calibration data
    data_driven: ClassVar[bool] = True

    def __post_init__(self) -> None:
        limit = getattr(self, "batches", None)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise InputError(f"importance.{self.name}: batches must be an integer >= 1, not {limit!r}")

    @abstractmethod
    def scores(
        self,
        target: CompileState | nn.Module,
        analysis: Analysis,
        batches: Iterable[Any] | None = None,
    ) -> dict[int, np.ndarray]:
        """One score array per prunable group id of ``analysis``."""

    @staticmethod
    def batches_for(target: CompileState | nn.Module, batches: Iterable[Any] | None, limit: int) -> list[Batch]:
        if batches is not None:
            return [as_batch(b) for b in batches]
        if isinstance(target, CompileState):
            return calibration_batches(target, limit)
        raise ValueError("give calibration batches when scoring a bare module")


class ImportancePass(Pass):
    """The ``importance.<name>`` pass of an estimator (generated by :func:`estimator`): score the
    working student on the calibration batches and store the scores."""

    in_place = False  # reads weights only

    ensures: ClassVar[frozenset[str]] = frozenset({"importance"})

    def run(self, state: CompileState) -> PassResult:
        est: ImportanceEstimator = self.options
        run_estimator(state, est)
        return PassResult(state, False)


E = TypeVar("E", bound=type[ImportanceEstimator])


#: the one estimator registry: name -> class, filled by ``@estimator`` where each estimator lives
#: (built-ins on first use through ``BUILTIN_ESTIMATORS``, plugins when their file is imported)
ESTIMATORS: dict[str, type[ImportanceEstimator]] = {}


def estimator(cls: E) -> E:
    """Class decorator: register a frozen-dataclass estimator by its ``name`` (usable as
    ``prune.width{importance=<name>}``) and make it the pass ``importance.<name>``."""
    ESTIMATORS[cls.name] = cls
    pass_cls = type(
        f"{cls.__name__}Pass",
        (ImportancePass,),
        {"name": f"importance.{cls.name}", "Options": cls, "__doc__": cls.__doc__, "__module__": cls.__module__},
    )
    register_pass(pass_cls)
    return cls


def run_estimator(state: CompileState, est: ImportanceEstimator) -> dict[int, np.ndarray]:
    """Score the working student with ``est`` and store the scores (``write_importance``)."""
    analysis = state.analysis()
    limit = int(getattr(est, "batches", DEFAULT_CALIB_BATCHES))
    batches = calibration_batches(state, limit) if est.data_driven else None
    scores = est.scores(state, analysis, batches)
    write_importance(state, scores, est.name)
    return scores


def write_importance(state: CompileState, scores: dict[int, np.ndarray], method: str) -> None:
    """Store scores on the working student and establish the fact ``"importance"``."""
    s = state.working()
    s.importance = dict(scores)
    s.metrics["importance_method"] = method
    state.facts.add("importance")
