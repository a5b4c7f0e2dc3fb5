"""What ``prune.width`` is asked and how it is judged: its options, the groups it selects, the
budget a ratio becomes, per-kind and local counts, the width record, and the held-out choice
between a plain and a refitted student. Shared by ``width``, ``decoder`` and ``depth``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from potstill.errors import InputError
from potstill.passes.importance import calibration_batches
from potstill.state import CompileState, Student
from torch import nn

from .align import choose_width
from .budget import CostModel

if TYPE_CHECKING:
    from potstill.ir.capture import Analysis, CoupledGroup

#: kinds pruned by default; ``hidden`` (the residual stream of a transformer) only when named
DEFAULT_KINDS = ("channels", "neurons", "heads", "kv_heads", "conv_groups")
ALL_KINDS = (*DEFAULT_KINDS, "hidden")


#: calibration batches an estimator reads by default (Kwon et al. estimate the Fisher on 2,048
#: samples; 32 batches of 8 sentences is what a 2-core CPU scores in seconds)
IMPORTANCE_BATCHES = 32
#: "every calibration batch" (the data are bounded where they are read: ``potstill.inputs``)
ALL_BATCHES = 1 << 30

#: options that say how much to prune; exactly one of them is required
AMOUNT_OPTIONS = ("ratio", "per_kind", "macs_budget", "params_budget", "latency_budget_ms")
ALLOCATIONS = ("auto", "latency", "global", "local", "sensitivity")
REFITS = ("scale", "full")
SCOPES = ("auto", "all", "expansion")
RATIO_OF = ("total", "prunable")


def _number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"prune.width: {name} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise InputError(f"prune.width: {name} must be finite, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class WidthOptions:
    """Options of ``prune.width`` (checked on construction; see the module docstring)."""

    #: fraction of the MACs removed (of the predicted latency when the profile has a latency table), in (0, 1)
    ratio: float | None = None
    #: explicit fractions of *units* removed per kind instead, e.g. [heads=0.25,neurons=0.5]
    per_kind: tuple[str, ...] = ()
    #: kinds to prune (default: all but hidden); naming a kind in per_kind selects it too
    kinds: tuple[str, ...] = ()
    #: MACs / parameter budget: a fraction of the current model's (<= 1) or an absolute count
    macs_budget: float | None = None
    params_budget: float | None = None
    #: latency budget in ms, predicted from the profile (table or roofline) and scaled to a measurement
    latency_budget_ms: float | None = None
    #: estimator: auto, magnitude, taylor, fisher, activation, obs (default: the scores of the
    #: importance pass that ran before, else auto)
    importance: str | None = None
    #: calibration batches read by data-driven estimators (the refit reads ``refit_batches``)
    batches: int = IMPORTANCE_BATCHES
    #: calibration batches the least-squares refit reads (default: all of them)
    refit_batches: int | None = None
    #: iterative schedule: prune in this many steps, re-scoring in between
    steps: int = 1
    #: channel multiple to align to (default: the profile's, else 8; 1: no alignment)
    align: int | None = None
    #: let the profile's latency table pick among aligned widths no wider than asked
    use_table: bool = True
    #: "latency" (Kwon's mask search under per-sublayer latency measured here; heads and neurons),
    #: "global" (units ranked by importance per cost across groups), "local" (one unit fraction for
    #: all), or "auto": latency where it applies (``latency_search.applies``), else global
    allocation: str = "auto"
    #: global allocation: every group keeps at least this fraction of its units
    floor: float = 0.1
    #: same width for every group of a kind with the same size
    uniform: bool = False
    #: also prune groups the IR marks inexact
    inexact: bool = False
    #: least-squares refit of the consumers of pruned units (default: on when calibration data exists)
    reconstruct: bool | Literal["auto"] | None = None
    #: Kwon et al.'s mask rearrangement with the Fisher estimator's per-sample gradients
    rearrange: bool = True
    #: what the refit changes: "scale" (one factor per kept unit and the bias: Kwon's mask tuning),
    #: "full" (every kept weight, pulled toward its old value by the ridge); None: "full" for
    #: inverted-residual expansions (scope), "scale" otherwise
    refit: str | None = None
    #: which groups: "expansion" (only the inside of inverted-residual blocks: expansion -> depthwise
    #: -> projection; residual widths stay), "all", or "auto" (expansion when the model has such blocks)
    scope: str = "auto"
    #: ridge of the least-squares refit, relative to the Gram's mean diagonal
    ridge: float = 1e-3
    #: what ``ratio`` is a fraction of: "total" (the model's MACs) or "prunable" (the MACs outside
    #: pinned parts such as a decoder's embeddings and LM head)
    ratio_of: str = "total"

    def __post_init__(self) -> None:
        given = [n for n in AMOUNT_OPTIONS if getattr(self, n) not in (None, ())]
        if not given:
            raise InputError(
                "prune.width: say how much to prune: ratio=R (remove about R of the MACs), "
                "per_kind=[KIND=R,...], macs_budget=, params_budget= or latency_budget_ms="
            )
        if len(given) > 1:
            raise InputError(f"prune.width: give one of {', '.join(AMOUNT_OPTIONS)}, not {' and '.join(given)}")
        ratio = _number("ratio", self.ratio)
        if ratio is not None and not 0.0 < ratio < 1.0:
            raise InputError(f"prune.width: ratio={self.ratio} must be a fraction of the MACs to remove, in (0, 1)")
        for name in ("macs_budget", "params_budget", "latency_budget_ms"):
            v = _number(name, getattr(self, name))
            if v is not None and v <= 0:
                raise InputError(f"prune.width: {name}={v} must be > 0")
        parse_per_kind(self.per_kind)
        unknown = set(self.kinds) - set(ALL_KINDS)
        if unknown:
            raise InputError(f"prune.width: unknown kinds {sorted(unknown)}; kinds are {ALL_KINDS}")
        if self.importance is not None and self.importance != "auto":
            from potstill.passes.importance import estimator_class

            estimator_class(str(self.importance))
        if self.allocation not in ALLOCATIONS:
            raise InputError(f"prune.width: allocation must be one of {ALLOCATIONS}, not {self.allocation!r}")
        for name, low in (("batches", 1), ("refit_batches", 1), ("steps", 1), ("align", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise InputError(f"prune.width: {name} must be an integer >= {low}, not {v!r}")
        floor = _number("floor", self.floor)
        if floor is None or not 0.0 <= floor < 1.0:
            raise InputError(f"prune.width: floor={self.floor} must be in [0, 1)")
        ridge = _number("ridge", self.ridge)
        if ridge is None or ridge <= 0:
            raise InputError(f"prune.width: ridge={self.ridge} must be > 0")
        if self.reconstruct == "auto":
            object.__setattr__(self, "reconstruct", None)
        if self.reconstruct is not None and not isinstance(self.reconstruct, bool):
            raise InputError(f"prune.width: reconstruct must be true, false or auto, not {self.reconstruct!r}")
        if self.scope not in SCOPES:
            raise InputError(f"prune.width: scope must be one of {SCOPES}, not {self.scope!r}")
        if self.refit is not None and self.refit not in REFITS:
            raise InputError(f"prune.width: refit must be one of {REFITS}, not {self.refit!r}")
        if self.ratio_of not in RATIO_OF:
            raise InputError(f"prune.width: ratio_of must be one of {RATIO_OF}, not {self.ratio_of!r}")
        if self.ratio_of != "total" and self.ratio is None:
            raise InputError("prune.width: ratio_of applies to ratio=, not to budgets or per_kind")
        if self.allocation == "latency" and self.ratio is None:
            raise InputError("prune.width: allocation=latency takes its budget from ratio=R")
        if self.per_kind and self.allocation not in ("auto", "global"):
            raise InputError("prune.width: allocation applies to ratio and budgets, not to per_kind")


def group_label(g: CoupledGroup) -> str:
    """A name for a group that survives surgery: its first producing parameter."""
    outs = sorted(m.param for m in g.members if m.role == "out")
    return outs[0] if outs else sorted(m.param for m in g.members)[0]


def parse_per_kind(entries: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in entries:
        kind, sep, value = str(e).partition("=")
        kind = kind.strip()
        if not sep or kind not in ALL_KINDS:
            raise InputError(f"prune.width: per_kind entry '{e}' must be KIND=FRACTION with KIND in {ALL_KINDS}")
        if kind in out:
            raise InputError(f"prune.width: per_kind names '{kind}' twice")
        try:
            r = float(value)
        except ValueError as err:
            raise InputError(f"prune.width: per_kind entry '{e}': '{value}' is not a number") from err
        if not 0.0 <= r < 1.0:
            raise InputError(f"prune.width: per_kind entry '{e}': the fraction of units removed must be in [0, 1)")
        out[kind] = r
    return out


def select_groups(analysis: Analysis, opts: WidthOptions) -> list[CoupledGroup]:
    per_kind = parse_per_kind(opts.per_kind)
    kinds = set(per_kind) if per_kind else set(opts.kinds or DEFAULT_KINDS)
    # a kind named explicitly is pruned even where the IR marks it inexact (hidden size: the norms'
    # statistics change with the channels, which is what hidden-size pruning means)
    named = set(opts.kinds) | set(per_kind)
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


@dataclass
class Budget:
    """What the widths must meet: ``measure(keep) <= limit`` (predicted), and how it was asked."""

    measure: Callable[[Mapping[int, int]], float]
    limit: float
    full: float
    what: str
    asked: str


def ratio_basis(profile: Any) -> Literal["macs", "latency"]:
    """What ``ratio=R`` is a fraction of on ``profile``: its predicted latency where the profile has
    a measured latency table, else the MACs. ``_budget`` turns a ratio into that budget and the
    planner names students by it (``macs50``, ``latency50``), so the two cannot disagree. (Heads and
    neurons on a cpu ONNX Runtime profile without a table may instead be allocated by the host-timed
    latency search, ``latency_search.applies``, which the profile alone does not decide.)

    >>> ratio_basis(None)
    'macs'
    """
    return "macs" if getattr(profile, "latency_table", None) is None else "latency"


def _budget(state: CompileState, o: WidthOptions, cost: CostModel, groups: list[CoupledGroup]) -> Budget:
    full_keep = {g.id: g.n_units for g in groups}
    if o.macs_budget is not None or (o.ratio is not None and ratio_basis(state.profile) == "macs"):
        full = cost.macs(full_keep)
        if o.ratio is not None:
            return Budget(cost.macs, (1 - o.ratio) * full, full, "MACs", f"ratio {o.ratio:g} of the MACs")
        asked = float(o.macs_budget or 0)
        limit = asked * full if asked <= 1 else asked
        return Budget(cost.macs, limit, full, "MACs", f"macs_budget {o.macs_budget:g}")
    if o.params_budget is not None:
        full = cost.params(full_keep)
        limit = o.params_budget * full if o.params_budget <= 1 else o.params_budget
        return Budget(cost.params, limit, full, "params", f"params_budget {o.params_budget:g}")
    predicted_full = cost.latency_ms(full_keep, state.profile)
    measured = state.working().metrics.get("latency_ms")
    value = measured.get("median") if isinstance(measured, dict) else measured
    scale = float(value) / predicted_full if isinstance(value, (int, float)) and value > 0 else 1.0

    def predict(keep: Mapping[int, int]) -> float:
        return scale * cost.latency_ms(keep, state.profile)

    full = predict(full_keep)
    if o.ratio is not None:
        return Budget(predict, (1 - o.ratio) * full, full, "ms", f"ratio {o.ratio:g} of the latency (table)")
    return Budget(predict, float(o.latency_budget_ms or 0), full, "ms", f"latency_budget_ms {o.latency_budget_ms:g}")


def _aligned(g: CoupledGroup, target: float, multiple: int, table: Any, layers: Mapping[str, Any]) -> tuple[int, str]:
    op, shape = _producer(g, layers) if table is not None else (None, None)
    return choose_width(target, g.n_units, g.unit_channels, multiple, table=table, op=op, shape=shape)


def local_counts(groups: list[CoupledGroup], fractions: Mapping[int, float], multiple: int, table: Any,
                 layers: Mapping[str, Any], uniform: bool) -> tuple[dict[int, int], dict[int, str]]:
    """Each group keeps ``(1 - fraction) * n`` units, aligned (the table may narrow, never widen)."""
    keep: dict[int, int] = {}
    how: dict[int, str] = {}
    chosen: dict[tuple[str, int, float], tuple[int, str]] = {}
    for g in groups:
        key = (g.kind, g.n_units, round(fractions[g.id], 6))
        if uniform and key in chosen:
            keep[g.id], how[g.id] = chosen[key]
            continue
        keep[g.id], how[g.id] = chosen[key] = _aligned(g, (1 - fractions[g.id]) * g.n_units, multiple, table, layers)
    return keep, how


def _local_budget(groups: list[CoupledGroup], budget: Budget, multiple: int, table: Any,
                  layers: Mapping[str, Any], uniform: bool) -> tuple[dict[int, int], dict[int, str]]:
    """The smallest single unit fraction whose aligned widths meet the budget (bisection)."""

    def at(r: float) -> tuple[dict[int, int], dict[int, str]]:
        return local_counts(groups, dict.fromkeys((g.id for g in groups), r), multiple, table, layers, uniform)

    lo, hi = 0.0, 0.97
    if budget.measure(at(hi)[0]) > budget.limit:
        raise InputError(f"prune.width: a {budget.what} budget of {budget.limit:.4g} cannot be met by width pruning alone")
    for _ in range(20):
        mid = (lo + hi) / 2
        if budget.measure(at(mid)[0]) <= budget.limit:
            hi = mid
        else:
            lo = mid
    return at(hi)


def record_arch(state: CompileState, student: Student, widths: dict[str, dict[str, Any]]) -> None:
    arch = dict(student.metrics.get("arch") or {})
    arch.setdefault("widths", {}).update(widths)
    a = state.analysis(student)
    arch["macs"], arch["params"] = int(a.cost.macs), int(a.cost.params)
    student.metrics["arch"] = arch


def fit_and_heldout(state: CompileState, limit: int) -> tuple[list[Any], list[Any]]:
    """Calibration batches for the refit, and held-out batches to judge it: ``state.heldout_data``
    when the driver split one off, else the last quarter of the calibration batches (then not
    used for the refit)."""
    from potstill.inputs.data import as_batch

    batches = calibration_batches(state, limit)
    heldout_fn = getattr(state, "heldout_data", None)
    if callable(heldout_fn):
        return batches, [as_batch(b) for b in list(heldout_fn())[:limit]]
    if len(batches) < 4 or state.calib_data is None:
        return batches, []
    cut = len(batches) - max(1, len(batches) // 4)
    return batches[:cut], batches[cut:]


def heldout_error(reference: nn.Module, model: nn.Module, batches: list[Any]) -> float:
    """``sum ||y - y_ref||^2 / sum ||y_ref||^2`` of the primary outputs (padding masked out)."""
    from potstill.inputs.data import primary_output

    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            y_ref, y = primary_output(b.run(reference)).double(), primary_output(b.run(model)).double()
            mask = b.kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and y.shape[:2] == mask.shape:
                y_ref, y = y_ref[mask.bool()], y[mask.bool()]
            num += float(((y - y_ref) ** 2).sum())
            den += float((y_ref**2).sum())
    return num / den if den > 0 else float("inf")


def choose_refit(source: nn.Module, plain: nn.Module, refitted: nn.Module, heldout: list[Any],
                 student: Student) -> tuple[nn.Module, bool]:
    """The refitted model if it is closer to ``source`` on held-out batches, else the plain one;
    the comparison goes to ``student.metrics["prune"]["candidates"]``."""
    errors = {"plain": heldout_error(source, plain, heldout), "refit": heldout_error(source, refitted, heldout)}
    better = math.isfinite(errors["refit"]) and errors["refit"] <= errors["plain"]
    student.metrics.setdefault("prune_candidates", []).append(
        {"measure": "held-out relative output error", **errors, "chosen": "refit" if better else "plain"})
    return (refitted, True) if better else (plain, False)
