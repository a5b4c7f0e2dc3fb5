"""Width pruning: keep the top-k units of every coupled group, at widths the device runs fast.

For each selected group ``g`` with ``n_g`` units and scores ``s_g`` (an ``importance.*`` pass, or
the estimator named by ``importance=``):

    k_g = align((1 - r_kind) * n_g)        keep = top-k_g units of s_g   ->  surgery.prune_width

``r`` is the fraction of units removed: one ``ratio``, per-kind overrides (``per_kind=[heads=0.5]``),
or the smallest ratio whose predicted cost meets a MACs / parameter / latency budget
(``budget.CostModel``, bisection). ``align`` rounds to the profile's channel multiple or picks from
its latency table (``align.py``). ``allocation=global`` instead ranks mean-normalised scores of all
groups of a kind together (non-uniform widths). Hugging Face students are pruned *uniformly* per
kind (same heads / FFN width in every layer) so their config can describe them. ``steps=k``
prunes geometrically in k steps, re-scoring between them (iterative pruning, Minitron / LLM-Pruner).
``reconstruct=true`` refits the consumers of pruned FFN neurons and heads by least squares on the
calibration data before slicing (``reconstruct.py``; closed form, no gradient steps).

After surgery the student records ``metrics["arch"]["widths"]`` (kept units per group, by the
group's producing parameter) and its MACs / params.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from potstill.errors import InputError
from potstill.hf import is_hf
from potstill.passes.importance import calibration_batches, get_estimator, write_importance
from potstill.pipeline import Pass, PassResult, register_pass
from potstill.state import CompileState, Student

from .align import channel_multiple, choose_width
from .budget import CostModel, layer_shapes
from .reconstruct import reconstruct

if TYPE_CHECKING:
    from potstill.ir import Analysis, CoupledGroup

#: kinds pruned by default; ``hidden`` (the residual stream of a transformer) only when named
DEFAULT_KINDS = ("channels", "neurons", "heads", "kv_heads", "conv_groups")
ALL_KINDS = (*DEFAULT_KINDS, "hidden")


@dataclass(frozen=True)
class WidthOptions:
    #: fraction of units removed from every selected group (0.5 halves the channels)
    ratio: float = 0.0
    #: per-kind ratios overriding ``ratio``, e.g. [heads=0.25,neurons=0.5,hidden=0.1]
    per_kind: tuple[str, ...] = ()
    #: kinds to prune (default: all but hidden); naming a kind in per_kind selects it too
    kinds: tuple[str, ...] = ()
    #: MACs / parameter budget: a fraction of the current model's (<= 1) or an absolute count
    macs_budget: float = 0.0
    params_budget: float = 0.0
    #: latency budget in ms (0: the profile's latency_budget_ms when no ratio/budget is given)
    latency_budget_ms: float = 0.0
    #: estimator when no importance pass ran: magnitude, l1, taylor, fisher, activation
    importance: str = "magnitude"
    #: calibration batches for data-driven estimators
    batches: int = 8
    #: iterative schedule: prune in this many steps, re-scoring in between
    steps: int = 1
    #: channel multiple to align to (0: the profile's, else 8; 1: no alignment)
    align: int = 0
    #: use the profile's latency table to choose widths when it has one
    use_table: bool = True
    #: "local" (each group keeps its share) or "global" (rank groups of a kind together)
    allocation: str = "local"
    #: same width for every group of a kind with the same size (forced for Hugging Face models)
    uniform: bool = False
    #: also prune groups the IR marks inexact
    inexact: bool = False
    #: refit the consumers of pruned FFN neurons / heads by least squares on calibration data
    reconstruct: bool = False


def group_label(g: CoupledGroup) -> str:
    """A name for a group that survives surgery: its first producing parameter."""
    outs = sorted(m.param for m in g.members if m.role == "out")
    return outs[0] if outs else sorted(m.param for m in g.members)[0]


def parse_per_kind(entries: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in entries:
        kind, sep, value = str(e).partition("=")
        if not sep or kind.strip() not in ALL_KINDS:
            raise InputError(f"prune.width: per_kind entry '{e}' must be KIND=RATIO with KIND in {ALL_KINDS}")
        out[kind.strip()] = float(value)
    return out


def select_groups(analysis: Analysis, opts: WidthOptions) -> list[CoupledGroup]:
    kinds = set(opts.kinds or DEFAULT_KINDS) | set(parse_per_kind(opts.per_kind))
    unknown = kinds - set(ALL_KINDS)
    if unknown:
        raise InputError(f"prune.width: unknown kinds {sorted(unknown)}; kinds are {ALL_KINDS}")
    # a kind named explicitly is pruned even where the IR marks it inexact (hidden size: the norms'
    # statistics change with the channels, which is what hidden-size pruning means)
    named = set(opts.kinds) | set(parse_per_kind(opts.per_kind))
    return [
        g for g in analysis.prunable()
        if g.kind in kinds and (g.exact or opts.inexact or g.kind in named) and g.n_units > 1
    ]


def _producer(g: CoupledGroup, layers: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The latency-table op and shape (without cout) of the costliest layer producing the group;
    ``cin`` is left out (so it follows the candidate width) when the layer's input is the group too."""
    best: tuple[float, str, dict[str, Any]] | None = None
    in_group = {m.param for m in g.members if m.dim == 1}
    for m in g.members:
        layer = layers.get(m.module)
        if not (m.role == "out" and m.dim == 0 and layer is not None and layer.weight == m.param):
            continue
        q = layer.query()
        q.pop("cout")
        if layer.op == "conv2d" and layer.groups > 1:
            q["groups"] = "depthwise" if layer.groups == layer.cout else layer.groups
        if m.param in in_group and q.get("groups") != "depthwise":
            q.pop("cin")
        work = layer.cin * layer.cout / layer.groups * layer.kernel**2 * layer.hw**2 * layer.tokens
        if best is None or work > best[0]:
            best = (work, layer.op, q)
    return (best[1], best[2]) if best else (None, None)


class Allocator:
    """Kept unit counts per group for a ratio, aligned to the device."""

    def __init__(self, state: CompileState, analysis: Analysis, groups: list[CoupledGroup], *,
                 opts: WidthOptions, uniform: bool, layers: Mapping[str, Any]) -> None:
        self.analysis, self.groups, self.opts, self.uniform = analysis, groups, opts, uniform
        self.multiple = channel_multiple(state.profile, opts.align)
        table = getattr(state.profile, "latency_table", None) if opts.use_table else None
        self.table = table
        self.layers = layers
        self.how: dict[int, str] = {}

    def ratios(self, ratio: float) -> dict[int, float]:
        per_kind = parse_per_kind(self.opts.per_kind)
        return {g.id: per_kind.get(g.kind, ratio) for g in self.groups}

    def counts(self, ratios: Mapping[int, float], scores: Mapping[int, np.ndarray] | None = None) -> dict[int, int]:
        targets = {g.id: (1.0 - ratios[g.id]) * g.n_units for g in self.groups}
        if self.opts.allocation == "global" and not self.uniform and scores is not None:
            targets = self._global_targets(ratios, scores)
        out: dict[int, int] = {}
        chosen: dict[tuple[str, int, int], int] = {}
        for g in self.groups:
            key = (g.kind, g.n_units, round(targets[g.id] * 1000))
            if self.uniform and key in chosen:
                out[g.id] = chosen[key]
                self.how[g.id] = "uniform"
                continue
            op, shape = _producer(g, self.layers) if self.table is not None else (None, None)
            k, how = choose_width(targets[g.id], g.n_units, g.unit_channels, self.multiple,
                                  table=self.table, op=op, shape=shape)
            out[g.id], self.how[g.id] = k, how
            chosen[key] = k
        return out

    def _global_targets(self, ratios: Mapping[int, float], scores: Mapping[int, np.ndarray]) -> dict[int, float]:
        targets: dict[int, float] = {}
        for kind in {g.kind for g in self.groups}:
            gs = [g for g in self.groups if g.kind == kind]
            pooled = np.concatenate([scores[g.id] / max(float(np.mean(scores[g.id])), 1e-12) for g in gs])
            n_drop = round(ratios[gs[0].id] * len(pooled))
            threshold = np.sort(pooled)[n_drop - 1] if n_drop > 0 else -np.inf
            for g in gs:
                norm = scores[g.id] / max(float(np.mean(scores[g.id])), 1e-12)
                targets[g.id] = float(max(1, int((norm > threshold).sum())))
        return targets


def _budget_ratio(cost: CostModel, alloc: Allocator, state: CompileState, opts: WidthOptions,
                  scores: Mapping[int, np.ndarray]) -> tuple[float, str]:
    """The smallest ratio whose predicted cost meets the budget (bisection)."""
    full = {g.id: g.n_units for g in alloc.groups}
    if opts.macs_budget > 0:
        base = cost.macs(full)
        budget = opts.macs_budget * base if opts.macs_budget <= 1 else opts.macs_budget
        predict, what = cost.macs, "MACs"
    elif opts.params_budget > 0:
        base = cost.params(full)
        budget = opts.params_budget * base if opts.params_budget <= 1 else opts.params_budget
        predict, what = cost.params, "params"
    else:
        budget = opts.latency_budget_ms or float(getattr(state.profile, "latency_budget_ms", 0) or 0)
        measured = state.working().metrics.get("latency_ms")
        full_est = cost.latency_ms(full, state.profile)
        scale = float(measured.get("median", measured) if isinstance(measured, dict) else measured or 0) / full_est \
            if measured else 1.0

        def predict(keep: Mapping[int, int]) -> float:
            return scale * cost.latency_ms(keep, state.profile)

        what = "ms"
    lo, hi = 0.0, 0.97
    if predict(alloc.counts(alloc.ratios(hi), scores)) > budget:
        raise InputError(f"prune.width: a {what} budget of {budget:.4g} cannot be met by width pruning alone")
    for _ in range(20):
        mid = (lo + hi) / 2
        if predict(alloc.counts(alloc.ratios(mid), scores)) <= budget:
            hi = mid
        else:
            lo = mid
    return hi, f"{what} <= {budget:.4g}"


def _scores(state: CompileState, student: Student, analysis: Analysis, method: str, batches: int) -> dict[int, np.ndarray]:
    have = student.importance
    if have and all(g.id in have and len(have[g.id]) == g.n_units for g in analysis.prunable()):
        return have
    est = get_estimator(method, batches)
    scores = est.scores(state, analysis)
    write_importance(state, scores, est.name)
    return scores


def record_arch(state: CompileState, student: Student, widths: dict[str, dict[str, Any]]) -> None:
    arch = dict(student.metrics.get("arch") or {})
    arch.setdefault("widths", {}).update(widths)
    a = state.analysis(student)
    arch["macs"], arch["params"] = int(a.cost.macs), int(a.cost.params)
    student.metrics["arch"] = arch


@register_pass
class WidthPrunePass(Pass):
    """``prune.width{ratio=0.5}``: physically smaller, hardware-aligned students."""

    name: ClassVar[str] = "prune.width"
    Options: ClassVar[type] = WidthOptions
    ensures: ClassVar[frozenset[str]] = frozenset({"pruned"})

    def run(self, state: CompileState) -> PassResult:
        from potstill.surgery import keep_top, prune_width

        o: WidthOptions = self.options
        if o.allocation not in ("local", "global"):
            raise InputError(f"prune.width: allocation must be local or global, not {o.allocation!r}")
        if o.steps < 1:
            raise InputError("prune.width: steps must be >= 1")
        student = state.working()
        analysis = state.analysis(student)
        groups = select_groups(analysis, o)
        uniform = o.uniform or is_hf(student.module)
        layers = layer_shapes(student.module, state.example_inputs, state.example_kwargs)
        alloc = Allocator(state, analysis, groups, opts=o, uniform=uniform, layers=layers)
        # re-scoring between steps uses the estimator of the importance pass that ran, if one did
        fresh = bool(student.importance) and "importance" in state.facts
        method = str(student.metrics.get("importance_method", o.importance)) if fresh else o.importance
        scores = _scores(state, student, analysis, method, o.batches)
        has_budget = o.macs_budget > 0 or o.params_budget > 0 or o.latency_budget_ms > 0
        if not has_budget and o.ratio == 0 and not o.per_kind and getattr(state.profile, "latency_budget_ms", None):
            has_budget = True
        note = f"ratio {o.ratio}"
        ratio = o.ratio
        if has_budget:
            cost = CostModel.build(student.module, analysis, state.example_inputs, state.example_kwargs,
                                   with_layers=True)
            ratio, note = _budget_ratio(cost, alloc, state, o, scores)
        final = alloc.counts(alloc.ratios(ratio), scores)
        labels = {g.id: group_label(g) for g in groups}
        final_by_label = {labels[g.id]: (final[g.id], g.n_units) for g in groups}
        if all(k == n for k, n in final_by_label.values()):
            state.facts.add("pruned")
            return PassResult(state, False)
        for step in range(1, o.steps + 1):
            if step > 1:
                analysis = state.analysis(student)
                scores = _scores(state, student, analysis, method, o.batches)
            keep: dict[int, list[int]] = {}
            for g in analysis.prunable():
                label = group_label(g)
                if label not in final_by_label:
                    continue
                k_final, n0 = final_by_label[label]
                k = k_final if step == o.steps else round(n0 * (k_final / n0) ** (step / o.steps))
                k = max(k_final, min(g.n_units, k))
                if k < g.n_units:
                    keep[g.id] = keep_top(g, scores[g.id], k)
            if keep:
                source = student.module
                if o.reconstruct:
                    source, refitted = reconstruct(source, analysis, keep, calibration_batches(state, o.batches))
                    student.metrics.setdefault("reconstructed", []).extend(refitted)
                new = prune_width(source, analysis, keep)
                student.set_module(new, f"prune.width step {step}: {note}")
        state.facts.discard("importance")
        widths = {
            labels[g.id]: {"kind": g.kind, "units": final[g.id], "of": g.n_units,
                           "channels": final[g.id] * g.unit_channels, "how": alloc.how.get(g.id, "aligned")}
            for g in groups
        }
        record_arch(state, student, widths)
        state.facts.add("pruned")
        return PassResult(state, True)
