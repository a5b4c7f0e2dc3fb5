"""Width pruning: keep the best units of every coupled group, at widths the device runs fast.

How much: exactly one of ``ratio`` (remove about that fraction of the MACs -- of the predicted
latency when the profile has a measured latency table), ``macs_budget`` / ``params_budget`` /
``latency_budget_ms``, or ``per_kind`` (explicit fractions of *units* per kind). Giving none, or
two, is an error; so are values out of range (ratio in (0, 1), budgets > 0).

Where: ``allocation=auto`` (default) is ``latency`` where it applies, else ``global``; on a cheap
model it also builds a student with ``allocation=sensitivity`` and keeps the better (below).
``allocation=sensitivity`` measures each group's held-out loss at a few widths, pruned alone and
refitted, and buys widths by the least loss per unit of cost saved (NetAdapt / AMC, ``sensitivity.py``).
``allocation=latency`` is Kwon et al. 2022's mask search under a latency constraint: each
sublayer's latency as a function of its kept heads / neurons is measured on this host and heads and
neurons are bought globally by Fisher under ``ratio`` of that latency (``latency_search.py``,
``mask_search.py``; Fisher scores, heads and neurons only, a cpu profile without a latency table).
``allocation=global`` ranks every unit of every selected group by importance per
unit of cost saved and removes the cheapest-to-lose units until the budget is met (``allocate.py``;
Kwon et al. 2022's mask search), so groups lose different fractions; ``allocation=local`` removes one
fraction from every group (bisection on it). Counts are rounded to the profile's channel multiple;
a measured latency table may pick among aligned widths *no wider than asked*, never more, and what it
picked is recorded (``how: latency-table``). The predicted MACs are checked on the pruned student.

Which units: the top-k by score; with Fisher scores, Kwon's mask rearrangement re-picks the set
using the per-sample mask gradients (``rearrange=true``). Then the physical surgery, and
(``reconstruct``, default: on when calibration data exists) a sequential least-squares refit of
every layer that reads pruned units (``reconstruct.py``). ``steps=k`` prunes in k geometric steps,
re-scoring between them.

One estimator vocabulary across passes: ``importance=NAME`` runs that estimator here; an
``importance.NAME`` pass before ``prune.width`` provides the scores instead. Both at once with
different names is an error (never silently one of them). With neither, ``auto``: on a cheap model
(under ``CHEAP_MACS`` per forward pass) with held-out batches, one student per estimator in
``AUTO_CANDIDATES``, plus one with the default estimator and widths by measured sensitivity, and the
one closest to the teacher on the held-out batches is kept (the comparison is recorded in
``metrics["prune"]["estimators"]``); otherwise the mask Fisher (Kwon et
al.) when calibration data exists, magnitude without. Likewise ``reconstruct=auto`` keeps the refit
only when it lowers the held-out output error (``metrics["prune"]["candidates"]``). Held-out batches
are ``state.heldout_data`` when the driver split them off, else the last quarter of the calibration
batches, which the refit then does not read.

Inverted-residual CNNs (``scope=auto``, the default, finds expansion -> depthwise -> projection
groups): only the expansion channels are pruned, the residual widths stay, channels are ordered by
greedy OBS on the projection, widths are allocated by measured per-block held-out sensitivity per
unit of cost saved, and the projections are refitted in full (``expansion.py``).

The student records ``metrics["arch"]["widths"]`` (kept units per group, by the group's first
producing parameter, with how each was chosen) and ``metrics["prune"]`` (estimator, allocation,
budget asked / predicted / measured, layers refitted).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from potstill.errors import InputError
from potstill.ir.cow import shared_copy
from potstill.passes.importance import ImportanceEstimator, calibration_batches, run_estimator
from potstill.passes.importance.base import warn
from potstill.pipeline import Pass, PassResult, register_pass
from potstill.state import CompileState, Student
from torch import nn

from .align import channel_multiple
from .allocate import allocate, rearrange
from .budget import CostModel, layer_shapes
from .latency_search import LatencyAllocation, allocate_latency, applies
from .reconstruct import reconstruct
from .sensitivity import SensitivityPlan, plan_sensitivity
from .width_options import (
    ALL_BATCHES,
    DEFAULT_KINDS,
    Budget,
    WidthOptions,
    _budget,
    _local_budget,
    choose_refit,
    fit_and_heldout,
    group_label,
    heldout_error,
    local_counts,
    parse_per_kind,
    ratio_basis,
    record_arch,
    select_groups,
)

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis, CoupledGroup

@register_pass
class WidthPrunePass(Pass):
    """``prune.width{ratio=0.5}``: physically smaller, hardware-aligned students."""

    in_place = False  # builds a new, smaller module (potstill.ir.cow): the source is only read

    name: ClassVar[str] = "prune.width"
    Options: ClassVar[type] = WidthOptions
    ensures: ClassVar[frozenset[str]] = frozenset({"pruned"})

    def run(self, state: CompileState) -> PassResult:
        from potstill.passes.importance import get_estimator

        from .decoder import prune_decoder

        o: WidthOptions = self.options
        student = state.working()
        if _decoder_path(state, student, o):
            return prune_decoder(state, student, o)  # FLAP / angular depth, chosen by held-out perplexity
        if o.ratio_of != "total":
            raise InputError("prune.width: ratio_of=prunable is defined for decoders (*ForCausalLM) pruned "
                             "by the default estimator; give ratio_of=total here")
        candidates = auto_candidates(state, student, o)
        if candidates and _expansion_scope(student.module, state.analysis(student), select_groups(state.analysis(student), o), o):
            candidates = ()  # expansion channels are ordered by the projection's OBS, not by an estimator
        if not candidates:
            return self._run_one(state, student, choose_estimator(state, student, o))
        # importance=auto on a cheap model: build one student per estimator (widths by the global
        # allocation) and one with widths from measured sensitivity, keep the one closest to the
        # teacher on held-out batches, and record the comparison
        _, heldout = fit_and_heldout(state, o.batches)
        trials: list[tuple[float, int, str, str, Student]] = []
        for i, (name, allocation) in enumerate(candidates):
            trial = Student(student.name, shared_copy(student.module), list(student.history),
                            metrics=copy.deepcopy(student.metrics), artifacts=dict(student.artifacts))
            state.students[-1] = trial
            # one budget for every candidate: the MACs (the host-timed latency search would give the
            # Fisher candidate another budget and make the comparison unfair)
            self._run_one(state, trial, _Scores(get_estimator(name, batches=o.batches), None), comparing=True,
                          allocation=allocation)
            trials.append((heldout_error(student.module, trial.module, heldout), i, name, allocation, trial))
        best = min(trials, key=lambda t: (t[0], t[1]))[-1]
        state.students[-1] = best
        best.metrics["prune"]["estimators"] = [
            {"importance": n, "allocation": a, "heldout_error": e, "chosen": t is best} for e, _, n, a, t in trials
        ]
        return PassResult(state, True)

    def _run_one(self, state: CompileState, student: Student, method: Any, comparing: bool = False,
                 allocation: str | None = None) -> PassResult:  # fmt: skip
        o: WidthOptions = self.options
        allocation = allocation or o.allocation
        analysis = state.analysis(student)
        groups = select_groups(analysis, o)
        if not groups:
            raise InputError(f"prune.width: no prunable groups of kinds {sorted(set(o.kinds or DEFAULT_KINDS))} "
                             f"in this model ({len(analysis.prunable())} prunable groups of other kinds)")
        exps = _expansion_scope(student.module, analysis, groups, o)
        if exps:
            groups = [g for g in groups if g.id in {e.group for e in exps}]
        multiple = channel_multiple(state.profile, o.align or 0)
        plan = _expansion_plan(state, student, analysis, exps, groups, o, multiple) if exps else None
        if plan is not None:
            method = _Scores(method.estimator, dict(plan.scores), name="obs-greedy")
        scores = method.scores(state, analysis)
        table = getattr(state.profile, "latency_table", None) if o.use_table else None
        layers = layer_shapes(student.module, state.example_inputs, state.example_kwargs)
        uniform = o.uniform
        budget: Budget | None = None
        searched: LatencyAllocation | None = None
        if not o.per_kind:
            cost = CostModel.build(student.module, analysis, state.example_inputs, state.example_kwargs,
                                   with_layers=True)
            budget = _budget(state, o, cost, groups)
            searched = None if comparing and o.allocation == "auto" else \
                self._latency_search(state, student, groups, scores, method.comparable, table, multiple)

        refit = o.refit or ("full" if exps else "scale")
        sensed: SensitivityPlan | None = None

        def allocate_with(multiple: int) -> tuple[dict[int, int], dict[int, str]]:
            if o.per_kind:
                per_kind = parse_per_kind(o.per_kind)
                return local_counts(groups, {g.id: per_kind[g.kind] for g in groups}, multiple, table, layers, uniform)
            assert budget is not None
            if searched is not None:  # Kwon et al.'s search on this host's measured sublayer latencies
                return searched.result.keep, dict.fromkeys(searched.result.keep, "latency-search")
            if allocation == "local":
                return _local_budget(groups, budget, multiple, table, layers, uniform)
            if plan is not None:  # inverted-residual expansions: widths from measured per-block sensitivity
                return dict(plan.keep), dict.fromkeys(plan.keep, "sensitivity")
            if allocation == "sensitivity":  # widths from each group's measured held-out loss curve
                nonlocal sensed  # measured at this multiple (a fallback to 1 measures again)
                sensed = measured = self._sensitivity(state, student, analysis, groups, scores, budget, multiple, refit)
                return dict(measured.keep), dict.fromkeys(measured.keep, "sensitivity")
            try:
                # --ratio asks "about R of the MACs": where the pinned part (embeddings, the
                # output layer) makes R unreachable, prune as far as the floors allow and say so;
                # an explicit budget stays a hard one
                alloc = allocate(groups, scores, budget.measure, budget.limit, multiple=multiple,
                                 comparable=method.comparable, floor=o.floor, uniform=uniform,
                                 best_effort=o.ratio is not None)  # fmt: skip
            except ValueError as e:
                raise InputError(f"prune.width: the {budget.asked} cannot be met by width pruning alone: {e}") from e
            return alloc.keep, dict.fromkeys(alloc.keep, "global")

        final, how = allocate_with(multiple)
        asked = budget.asked if budget else list(o.per_kind)
        if searched is None and multiple > 1 and o.align is None and all(final[g.id] == g.n_units for g in groups):
            # groups too small for the profile's multiple: one that still removes units beats none
            final, how = allocate_with(1)
            warn(f"prune.width: {asked} removes no unit at the profile's channel multiple {multiple} "
                 f"(groups of {sorted({g.n_units for g in groups})[:6]} units); aligned to 1 instead")
            multiple = 1
        labels = {g.id: group_label(g) for g in groups}
        if all(final[g.id] == g.n_units for g in groups):
            # one behaviour for "nothing to prune", as for a model without prunable groups: exit 2
            raise InputError(f"prune.width: {asked} removes no unit of the {len(groups)} prunable groups "
                             f"(channel multiple {multiple}, largest group {max(g.n_units for g in groups)} units); "
                             "ask for a larger ratio or a smaller align")
        # auto: refit when there is calibration data, and keep the refit only if it is better on
        # held-out data (``choose_refit``)
        use_recon = o.reconstruct is True or (o.reconstruct is None and state.calib_data is not None)
        keep_sets = self._prune(state, student, groups, final, labels, method, scores, o, use_recon, refit)
        widths = {
            labels[g.id]: {"kind": g.kind, "units": final[g.id], "of": g.n_units,
                           "channels": final[g.id] * g.unit_channels, "how": how.get(g.id, "aligned")}
            for g in groups
        }
        record_arch(state, student, widths)
        macs_after = float(student.metrics["arch"]["macs"])
        record: dict[str, Any] = {
            "importance": method.name, "allocation": "per_kind" if o.per_kind else "latency" if searched else
            "global" if allocation == "auto" else allocation,
            "reconstructed": student.metrics.get("reconstructed", []) if use_recon else [],
            "rearranged": keep_sets, "macs_before": int(analysis.cost.macs), "macs_after": int(macs_after),
            "candidates": student.metrics.pop("prune_candidates", []),
            "scope": "expansion" if exps else "all", "refit": refit if use_recon else None,
        }
        if plan is not None:
            record["allocation"] = "sensitivity"
            record["blocks"] = plan.blocks
        if sensed is not None:
            record["allocation"] = "sensitivity"
            record["sensitivity"] = sensed.record(labels)
        if searched is not None:
            record["budget"] = searched.record()
        elif budget is not None:
            record["budget"] = {"asked": budget.asked, "what": budget.what, "limit": budget.limit, "full": budget.full}
            if budget.what == "MACs":
                # the prediction holds attention products constant, so the measured count is lower;
                # a budget is checked by measurement, never assumed
                record["budget"]["measured"] = macs_after
                record["budget"]["met"] = macs_after <= budget.limit * 1.001
                if not record["budget"]["met"]:
                    miss = (f"prune.width: the student has {macs_after:.4g} MACs, over the {budget.asked} "
                            f"budget of {budget.limit:.4g} ({1 - macs_after / budget.full:.0%} of the MACs removed; "
                            "the rest is in groups that cannot be pruned or are at their floor)")
                    if o.ratio is None:
                        raise InputError(miss)
                    warn(miss)
                    record["budget"]["note"] = miss
        student.metrics["prune"] = record
        state.facts.discard("importance")
        state.facts.add("pruned")
        return PassResult(state, True)

    def _sensitivity(self, state: CompileState, student: Student, analysis: Analysis,
                     groups: list[CoupledGroup], scores: dict[int, np.ndarray], budget: Budget,
                     multiple: int, refit: str) -> SensitivityPlan:  # fmt: skip
        """Widths from measured per-group held-out loss curves (``sensitivity.py``)."""
        o: WidthOptions = self.options
        _, heldout = fit_and_heldout(state, o.batches)
        if not heldout:
            raise InputError("prune.width: allocation=sensitivity measures each width on held-out batches; "
                             "give calibration data (--calib, --data or calib_data()) or use allocation=global")
        fit_refit, _ = fit_and_heldout(state, o.refit_batches or ALL_BATCHES)
        use_recon = o.reconstruct is not False and state.calib_data is not None

        def repair(source: nn.Module, pruned: nn.Module, keep: dict[int, list[int]]) -> None:
            if use_recon:
                reconstruct(source, pruned, analysis, keep, fit_refit, o.ridge, mode=refit)

        return plan_sensitivity(student.module, analysis, groups, scores, heldout, budget.measure, budget.limit,
                                multiple, o.floor, repair)

    def ratio_basis(self, state: CompileState, importance: str | None = None) -> Literal["macs", "latency"]:
        """What ``ratio`` is a fraction of when this pass prunes the teacher of ``state`` (after an
        ``importance.NAME`` pass when ``importance`` names one): the latency where the profile has a
        table (``width_options.ratio_basis``) or where the host-timed latency search allocates the
        heads and neurons (the latency of the sublayers, measured on this host), else the MACs. The
        planner names the students by it once the teacher is loaded (``macs10``, ``latency10``)."""
        from potstill.passes.importance import get_estimator

        o: WidthOptions = self.options
        basis = ratio_basis(state.profile)
        if basis == "latency" or o.ratio is None or o.per_kind or o.allocation not in ("auto", "latency"):
            return basis
        student = state.new_student("basis", share=True)
        if importance is None and (_decoder_path(state, student, o)
                                   or (o.allocation == "auto" and auto_candidates(state, student, o))):
            return basis  # the decoder's budget, or the estimators compared at one MACs budget
        analysis = state.analysis(student)
        groups = select_groups(analysis, o)
        if not groups or _expansion_scope(student.module, analysis, groups, o):
            return basis
        name = importance or o.importance or "auto"
        name = default_estimator(state, analysis) if name == "auto" else name
        comparable = get_estimator(name, batches=o.batches).comparable
        return "latency" if _searches_latency(state, o, groups, comparable, None) else basis

    def _latency_search(self, state: CompileState, student: Student, groups: list[CoupledGroup],
                        scores: dict[int, np.ndarray], comparable: bool, table: Any,
                        multiple: int) -> LatencyAllocation | None:  # fmt: skip
        """Kwon's latency-constrained mask search (``latency_search.py``) when ``allocation`` asks
        for it or is ``auto`` and it applies; None otherwise."""
        o: WidthOptions = self.options
        fits = _searches_latency(state, o, groups, comparable, table)
        if o.allocation == "latency" and not fits:
            raise InputError("prune.width: allocation=latency needs Fisher scores, only heads / neurons groups, "
                             "ratio=R and a cpu ONNX Runtime profile without a latency table; use allocation=global")
        if o.allocation not in ("auto", "latency") or not fits or o.ratio is None:
            return None
        return allocate_latency(state, student.module, groups, scores, calibration_batches(state, o.batches),
                                ratio=o.ratio, multiple=multiple, floor=o.floor)

    @staticmethod
    def _prune(state: CompileState, student: Student, groups: list[CoupledGroup], final: dict[int, int],
               labels: dict[int, str], method: ImportanceEstimator, scores: dict[int, np.ndarray],
               o: WidthOptions, use_recon: bool, refit: str) -> int:
        """Slice (in ``o.steps`` steps, re-scoring between them) and refit; returns how many groups
        the mask rearrangement changed."""
        from potstill.ir.surgery import keep_top, prune_width

        final_by_label = {labels[g.id]: (final[g.id], g.n_units) for g in groups}
        rearranged = 0
        for step in range(1, o.steps + 1):
            analysis = state.analysis(student)
            if step > 1:
                scores = method.scores(state, analysis)
            grads = _mask_grads(state, student) if o.rearrange and method.name == "fisher" else {}
            keep: dict[int, list[int]] = {}
            for g in analysis.prunable():
                label = group_label(g)
                if label not in final_by_label:
                    continue
                k_final, n0 = final_by_label[label]
                k = k_final if step == o.steps else round(n0 * (k_final / n0) ** (step / o.steps))
                k = max(k_final, min(g.n_units, k))
                if k < g.n_units:
                    top = keep_top(g, scores[g.id], k)
                    if g.id in grads:
                        better = rearrange(grads[g.id], k)
                        rearranged += int(better != top)
                        top = better
                    keep[g.id] = top
            if not keep:
                continue
            source = student.module
            new = prune_width(source, analysis, keep)
            if use_recon:
                fit, heldout = fit_and_heldout(state, o.refit_batches or ALL_BATCHES)
                plain = copy.deepcopy(new) if o.reconstruct is None and heldout else None
                done = reconstruct(source, new, analysis, keep, fit, o.ridge, mode=refit)
                if plain is not None and done:
                    new, chosen = choose_refit(source, plain, new, heldout, student)
                    done = done if chosen else []
                student.metrics.setdefault("reconstructed", []).extend(done)
            student.set_module(new, f"prune.width step {step}: {len(keep)} groups")
        return rearranged


def _mask_grads(state: CompileState, student: Student) -> dict[int, np.ndarray]:
    from potstill.passes.importance.fisher import MASK_GRADS_KEY

    found = state.records.get(MASK_GRADS_KEY)
    if isinstance(found, dict) and found.get("module") == id(student.module):
        return dict(found["grads"])
    return {}


class _Scores:
    """Scores for the width pass: from the importance pass that ran, or from the named estimator."""

    def __init__(self, estimator: ImportanceEstimator, existing: dict[int, np.ndarray] | None,
                 name: str | None = None) -> None:  # fmt: skip
        self.estimator, self.existing = estimator, existing
        self.name, self.comparable = name or estimator.name, estimator.comparable

    def scores(self, state: CompileState, analysis: Analysis) -> dict[int, np.ndarray]:
        if self.existing is not None:
            have, self.existing = self.existing, None
            return have
        return run_estimator(state, self.estimator)


def _decoder_path(state: CompileState, student: Student, o: WidthOptions) -> bool:
    """Whether ``run`` hands a causal LM to ``prune_decoder`` (FLAP or depth, by held-out perplexity)."""
    from .decoder import is_causal_lm

    return (is_causal_lm(student.module) and o.ratio is not None and o.importance in (None, "auto")
            and "importance" not in state.facts and state.calib_data is not None and not o.per_kind)


def _searches_latency(state: CompileState, o: WidthOptions, groups: Sequence[CoupledGroup], comparable: bool,
                      table: Any) -> bool:  # fmt: skip
    """Whether Kwon's host-timed latency search can allocate ``groups`` under ``ratio``."""
    return o.ratio is not None and table is None and applies(state, groups, comparable)


def choose_estimator(state: CompileState, student: Student, o: WidthOptions) -> Any:
    """The estimator the pass scores with (module docstring: one vocabulary across passes)."""
    from potstill.passes.importance import get_estimator

    ran = str(student.metrics.get("importance_method", "")) if "importance" in state.facts else ""
    analysis = state.analysis(student)
    fresh = bool(ran) and all(g.id in student.importance and len(student.importance[g.id]) == g.n_units
                              for g in analysis.prunable())
    if fresh:
        if o.importance is not None and o.importance != ran:
            raise InputError(
                f"prune.width{{importance={o.importance}}} after importance.{ran}: two estimators for one "
                f"pruning; drop one (prune.width{{importance=NAME}} runs the estimator itself)"
            )
        return _Scores(get_estimator(ran, batches=o.batches), dict(student.importance))
    name = o.importance or "auto"
    if name == "auto":
        name = default_estimator(state, analysis)
    return _Scores(get_estimator(name, batches=o.batches), None)


#: importance=auto tries these estimators when the model is cheap to prune several times
AUTO_CANDIDATES = ("fisher", "activation", "magnitude")
#: "cheap": MACs of one forward pass on the example inputs below this
CHEAP_MACS = 1e8


def auto_candidates(state: CompileState, student: Student, o: WidthOptions) -> tuple[tuple[str, str], ...]:
    """The (estimator, allocation) pairs ``importance=auto`` compares on held-out data, or () to use
    the default alone (an importance pass ran, an estimator was named, no data, nothing held out, or
    too costly): each estimator with the global allocation, and, where ``allocation=auto`` and a
    budget is given, the default estimator with widths from measured sensitivity."""
    if o.importance not in (None, "auto") or "importance" in state.facts or state.calib_data is None:
        return ()
    if state.analysis(student).cost.macs > CHEAP_MACS or not fit_and_heldout(state, o.batches)[1]:
        return ()
    pairs = tuple((name, o.allocation) for name in AUTO_CANDIDATES)
    if o.allocation == "auto" and not o.per_kind:
        pairs += ((default_estimator(state, state.analysis(student)), "sensitivity"),)
    return pairs


def default_estimator(state: CompileState, analysis: Analysis) -> str:
    """``auto``: Kwon's mask Fisher when there is calibration data, magnitude without it."""
    return "fisher" if state.calib_data is not None else "magnitude"


def _expansion_scope(model: nn.Module, analysis: Analysis, groups: list[CoupledGroup], o: WidthOptions) -> list[Any]:
    """The inverted-residual expansion groups to prune alone (``scope``), or [] to prune ``groups``."""
    if o.scope == "all" or o.per_kind:
        return []
    from .expansion import expansion_groups

    exps = expansion_groups(model, analysis, groups)
    if o.scope == "expansion" and not exps:
        raise InputError("prune.width{scope=expansion}: the model has no inverted-residual expansion "
                         "(pointwise -> depthwise -> pointwise) groups; use scope=all")
    return exps


def _expansion_plan(state: CompileState, student: Student, analysis: Analysis, exps: list[Any],
                    groups: list[CoupledGroup], o: WidthOptions, multiple: int) -> Any:  # fmt: skip
    """Widths by measured per-block sensitivity (``expansion.plan_expansions``) when there is data to
    fit and to hold out and a budget to allocate; else None (the estimator's global allocation)."""
    from .expansion import plan_expansions

    if o.allocation not in ("auto", "global") or o.per_kind or state.calib_data is None:
        return None
    fit, heldout = fit_and_heldout(state, o.batches)
    if not heldout:
        return None
    cost = CostModel.build(student.module, analysis, state.example_inputs, state.example_kwargs, with_layers=True)
    budget = _budget(state, o, cost, groups)
    return plan_expansions(student.module, analysis, exps, fit, heldout, budget.measure, budget.limit, multiple,
                           floor=max(o.floor, 0.25))  # fmt: skip
