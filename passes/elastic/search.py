"""Device-constrained search over a trained supernet: NSGA-II → Pareto front → measured finalists.

Objectives, per configuration ``c``: maximise accuracy ``A(c)`` (the user's metric on the extracted
subnet, else fidelity to the teacher on held-out batches, run in the supernet with the weights and
BatchNorm statistics that serve it, ``score.Scorer``), minimise latency ``T(c)`` and memory ``M(c)`` (``cost.CostModel``), subject to
``T ≤ T_max`` and ``M ≤ M_max``.

NSGA-II (Deb et al. 2002, doi:10.1109/4235.996017) with Deb's constraint domination: a feasible
point beats an infeasible one, two infeasible points compare by total violation, two feasible ones
by Pareto dominance. The first population holds the light cuts a loose budget ships (each dim one
choice below the largest subnet), uniform subnets, and a greedy descent from the largest subnet to
the latency budget (``seed_points``), filled up with random genomes. Each generation: binary
tournaments on (rank, −crowding), uniform crossover, per-gene mutation over the discrete choices, then the best ``P`` of parents ∪ children by
non-dominated rank and crowding distance (the spread of a point's neighbours on each objective).
The sort and crowding are a few dozen lines over a discrete genome, so they are written here
rather than pulling in an optimisation framework.

Budgets: an absolute ``latency_ms`` (only on a profile with a measured latency table), or speed-ups
over the teacher (``budget``): the teacher's engine is lowered and every engine the search builds is
timed interleaved with it, so a budget means "S× faster than the teacher on this host, now". The
predictor then works on the teacher's scale (``t = t_teacher / speed-up``), and ``T_max = t_teacher / S``.

Finalists: ``n`` feasible configurations spread along the front by predicted latency (over the
points at or above the fidelity floor when ``n`` of them reach it) — or, with one speed-up per
student, the most accurate point under each budget — are extracted, timed on the profile's engine
(``potstill.targets.lower``) and measured for memory on their own graph; any over a budget by
measurement is dropped and the next front point tried, at most ``students + extra_tries`` in all, so
the time spent measuring is bounded however loaded the host is. Each finalist records where it sits
on the front. A finalist ships with the trained weights or the weights before training, with
BatchNorm statistics re-estimated for it or as stored, whichever scores best on the held-out
batches (``keep``; the search ranks with the sources that win at three probe subnets, ``score``).
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potstill.errors import InputError
from potstill.fidelity import fidelity_floor
from potstill.inputs.data import Batch, as_batch
from potstill.targets.speedup import SpeedupReading, TeacherClock, engine_callable
from torch import nn

from .cost import CostModel, measured_memory_mb
from .extract import extract
from .keep import settle_weights
from .refit import refit_finalists
from .score import Scorer
from .space import ElasticSpace, SubnetConfig
from .supernet import Supernet, recalibrate_bn


@dataclass
class Candidate:
    genome: tuple[int, ...]
    config: SubnetConfig
    accuracy: float
    latency_ms: float
    memory_mb: float
    violation: float = 0.0
    rank: int = 0
    crowding: float = 0.0

    def objectives(self) -> tuple[float, float, float]:
        """All minimised; a NaN accuracy (a subnet that computes non-finite outputs) ranks last."""
        acc = self.accuracy if math.isfinite(self.accuracy) else -1.0
        return (-acc, self.latency_ms, self.memory_mb)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "accuracy": self.accuracy, "latency_ms": self.latency_ms,
                "memory_mb": self.memory_mb, "feasible": self.violation == 0.0}


# ---------------------------------------------------------------------------------------------
# NSGA-II core


def _dominates(a: Candidate, b: Candidate) -> bool:
    if a.violation != b.violation:
        return a.violation < b.violation
    oa, ob = a.objectives(), b.objectives()
    return all(x <= y for x, y in zip(oa, ob)) and any(x < y for x, y in zip(oa, ob))


def non_dominated_sort(pop: Sequence[Candidate]) -> list[list[Candidate]]:
    """Fronts F_1, F_2, ... (fast non-dominated sort); sets each candidate's ``rank``."""
    dominated: list[list[int]] = [[] for _ in pop]
    count = [0] * len(pop)
    fronts: list[list[int]] = [[]]
    for i, p in enumerate(pop):
        for j, q in enumerate(pop):
            if i != j and _dominates(p, q):
                dominated[i].append(j)
            elif i != j and _dominates(q, p):
                count[i] += 1
        if count[i] == 0:
            fronts[0].append(i)
    k = 0
    while fronts[k]:
        nxt = []
        for i in fronts[k]:
            pop[i].rank = k
            for j in dominated[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(j)
        fronts.append(nxt)
        k += 1
    return [[pop[i] for i in f] for f in fronts if f]


def crowding_distance(front: Sequence[Candidate]) -> None:
    """Sum over objectives of the normalised gap between each point's two neighbours (ends: ∞)."""
    for c in front:
        c.crowding = 0.0
    if len(front) <= 2:
        for c in front:
            c.crowding = float("inf")
        return
    for k in range(3):
        ordered = sorted(front, key=lambda c: c.objectives()[k])
        lo, hi = ordered[0].objectives()[k], ordered[-1].objectives()[k]
        ordered[0].crowding = ordered[-1].crowding = float("inf")
        if hi == lo:
            continue
        for prev, cur, nxt in zip(ordered, ordered[1:], ordered[2:]):
            cur.crowding += (nxt.objectives()[k] - prev.objectives()[k]) / (hi - lo)


def _select(pop: list[Candidate], n: int) -> list[Candidate]:
    out: list[Candidate] = []
    for front in non_dominated_sort(pop):
        crowding_distance(front)
        if len(out) + len(front) <= n:
            out.extend(front)
        else:
            out.extend(sorted(front, key=lambda c: -c.crowding)[: n - len(out)])
            break
    return out


def _tournament(pop: list[Candidate], rng: random.Random) -> Candidate:
    a, b = rng.sample(pop, 2) if len(pop) > 1 else (pop[0], pop[0])
    return min((a, b), key=lambda c: (c.rank, -c.crowding))


@dataclass
class Finalist:
    config: SubnetConfig
    module: nn.Module
    accuracy: float
    predicted_latency_ms: float
    measured_latency_ms: float
    predicted_memory_mb: float
    measured_memory_mb: float
    front_index: int
    artifact: Any = None
    #: the speed-up over the teacher, timed interleaved with it (``SpeedupReading.to_dict``; relative budgets)
    timing: dict[str, Any] | None = None
    #: held-out scores with the trained and the untrained weights and which it ships (``keep``); None
    #: when the supernet was not trained (or trained with a robust loss)
    weights_check: dict[str, Any] | None = None
    #: the least-squares refit's held-out scores and whether it was kept (``refit``); None: not tried
    refit: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"config": self.config.to_dict(), "accuracy": self.accuracy,
               "predicted_latency_ms": self.predicted_latency_ms, "measured_latency_ms": self.measured_latency_ms,
               "predicted_memory_mb": self.predicted_memory_mb, "measured_memory_mb": self.measured_memory_mb,
               "front_index": self.front_index}
        if self.timing is not None:
            out |= {"measured_speedup": self.timing["speedup"], "teacher_ms": self.timing["teacher_ms"],
                    "speedup_timing": self.timing}
        if self.weights_check is not None:
            out["weights_check"] = self.weights_check
        if self.refit is not None:
            out["refit"] = self.refit
        return out


@dataclass
class SearchResult:
    front: list[Candidate]
    finalists: list[Finalist]
    rejected: list[dict[str, Any]]
    evaluated: int
    seconds: float
    latency_source: str
    #: how latency was judged: the mode, the front points timed (bounded), and for speed-up budgets the
    #: teacher's time, the rounds spent and how many verdicts the host was too noisy to decide
    timing: dict[str, Any] = field(default_factory=dict)

    @property
    def candidates_per_s(self) -> float:
        return self.evaluated / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"front": [c.to_dict() for c in self.front], "finalists": [f.to_dict() for f in self.finalists],
                "rejected": self.rejected, "evaluated": self.evaluated, "seconds": self.seconds,
                "candidates_per_s": self.candidates_per_s, "latency_source": self.latency_source,
                "timing": self.timing}


@dataclass(frozen=True)
class SearchSettings:
    #: students to emit (None: one per speed-up budget when several are given, else 3)
    students: int | None = None
    #: absolute latency budget (ms); only for profiles with a measured latency table
    latency_ms: float | None = None
    memory_mb: float | None = None
    #: speed-up budgets over the teacher, timed interleaved with its engine (``budget``): one
    #: budget for every student, or one student per budget
    speedup: tuple | None = None
    #: a finalist meets ``S`` when its measured speed-up is at least ``S·(1 − tolerance)``
    speedup_tolerance: float = 0.05
    #: interleaved rounds per engine: at least ``timing_rounds``, more only to decide, never past the max
    timing_rounds: int = 5
    max_timing_rounds: int = 15
    #: front points timed beyond ``students`` before the search stops trying (bounds the measurement)
    extra_tries: int = 3
    #: spread the students over front points within this much fidelity of the best feasible one
    #: (widened to the fidelity floor, then to the whole front, when fewer than ``students`` are)
    band: float = 0.02
    population: int = 24
    generations: int = 8
    mutation: float = 0.2
    seed: int = 0
    #: refit each finalist's consumers of the elastic widths by least squares toward the nested
    #: teacher, kept where the held-out score rises (``refit``)
    refit: bool = True

    @property
    def wanted(self) -> int:
        if self.students is not None:
            return self.students
        return len(self.speedup) if self.speedup and len(self.speedup) > 1 else 3


def measure_latency(module: nn.Module, example_inputs: tuple[Any, ...], example_kwargs: dict[str, Any],
                    profile: Any, out_dir: Path) -> tuple[float, Any]:
    """Median latency (ms) of ``module`` on the profile's engine, and the artifact."""
    from potstill.targets import lower

    art = lower(module, example_inputs, profile, out_dir, example_kwargs=example_kwargs)
    median = art.latency_ms.get("median")
    if median is None or not math.isfinite(float(median)):
        # e.g. a TensorRT bundle built where no GPU is: nothing was timed, so no budget can be checked
        raise InputError(
            f"elastic search for profile '{profile.name}': its engine ({art.target}) could not be timed on this "
            f"machine ({'; '.join(art.notes[:2]) or 'no latency measured'}); search on the device itself"
        )
    return float(median), art


def search(
    net: Supernet,
    teacher: nn.Module,
    profile: Any,
    example_inputs: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None,
    heldout: Sequence[Any],
    calib: Sequence[Any],
    settings: SearchSettings = SearchSettings(),
    *,
    metric: Callable[[nn.Module], float] | None = None,
    work_dir: Path | None = None,
) -> SearchResult:
    """NSGA-II over ``net.space`` for ``profile``; returns the front and measured finalists.

    Engines built to time the anchors and finalists go to ``work_dir`` (kept), else to a temporary
    folder removed at the end (the finalists then carry no artifact; the lowering pass builds theirs).
    """
    temporary = work_dir is None
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="potstill-elastic-")))
        result = _search(net, teacher, profile, example_inputs, example_kwargs, heldout, calib, settings, metric,
                         Path(work_dir))
    if temporary:
        for f in result.finalists:
            f.artifact = None  # its files are gone
    return result


def absolute_budget_error(profile: Any, latency_ms: float) -> str:
    """Why an absolute latency budget is refused on a profile without a measured table, and the fix."""
    return (f"--latency-ms {latency_ms:g} on profile '{profile.name}': an absolute budget needs a profile with a "
            "measured latency table (it has none, so the milliseconds would be this host's under whatever load "
            "it has now); give --speedup S (S x faster than the teacher, measured against it here), or measure a "
            "table with 'potstill profile -o my-device.yaml' and pass --profile my-device.yaml")


def _search(net: Supernet, teacher: nn.Module, profile: Any, example_inputs: tuple[Any, ...],
            example_kwargs: dict[str, Any] | None, heldout: Sequence[Any], calib: Sequence[Any],
            settings: SearchSettings, metric: Callable[[nn.Module], float] | None, work_dir: Path) -> SearchResult:
    kwargs = dict(example_kwargs or {})
    example_batch = Batch(tuple(example_inputs), kwargs).size
    speedups = tuple(sorted(float(v) for v in settings.speedup or ()))
    if speedups and settings.latency_ms is not None:
        raise InputError("elastic search: give a speed-up budget or an absolute latency budget, not both")
    if settings.latency_ms is not None and profile.latency_table is None:
        raise InputError(absolute_budget_error(profile, settings.latency_ms))
    n = settings.wanted
    if len(speedups) > 1 and n != len(speedups):
        raise InputError(f"elastic search: {len(speedups)} speed-up budgets make one student each; "
                         f"students={n} does not match (drop --students or give one budget)")
    latency_budget = settings.latency_ms if settings.latency_ms is not None else \
        (None if speedups else profile.latency_budget_ms)
    memory_budget = settings.memory_mb if settings.memory_mb is not None else profile.memory_budget_mb
    scorer = Scorer(net, teacher, [as_batch(b) for b in heldout], [as_batch(b) for b in calib], metric)
    costs = CostModel.build(net, profile, example_batch)
    tmp = work_dir
    tmp.mkdir(parents=True, exist_ok=True)
    artifacts: dict[SubnetConfig, Any] = {}
    space = net.space
    smallest_mb = costs.memory_mb(space.smallest())
    if memory_budget is not None and smallest_mb > memory_budget:
        # known before timing anything: the weights and activations only shrink with the subnet
        raise InputError(f"memory budget {memory_budget} MB on {profile.name}: even the smallest subnet needs "
                         f"{smallest_mb:.3f} MB (weights + peak activations at batch {costs.batch}, "
                         f"{profile.precision}); relax --memory-mb or widen the space")
    clock: TeacherClock | None = None
    if speedups:
        # the teacher as the user has it (FP32); subnets are timed as they would ship (INT8 where it pays)
        _, teacher_art = measure_latency(teacher, tuple(example_inputs), kwargs, profile.unquantised(), tmp / "teacher")
        clock = TeacherClock(engine_callable(teacher_art, teacher, tuple(example_inputs), kwargs, profile),
                             min_rounds=settings.timing_rounds, max_rounds=settings.max_timing_rounds)
    reference: list[float] = []  # the teacher's ms in the first reading: the scale of relative times

    def timed(config: SubnetConfig, tag: str, threshold: float | None = None) -> tuple[float, SpeedupReading | None]:
        """Latency (ms; relative budgets: on the teacher's scale, ``teacher_ms / speed-up``) and the reading."""
        recalibrate_bn(net, config, scorer.calib)
        module = extract(net, config).module
        ms, art = measure_latency(module, tuple(example_inputs), kwargs, profile, tmp / tag)
        artifacts[config] = art
        if clock is None:
            return ms, None
        reading = clock.read(engine_callable(art, module, tuple(example_inputs), kwargs, profile), threshold)
        if not reference:
            reference.append(reading.teacher_ms)
        return reference[0] / reading.speedup, reading

    anchors = [(c, timed(c, f"anchor-{name}")[0]) for name, c in (("largest", space.largest()),
                                                                  ("smallest", space.smallest()))]
    anchors, anchor_record = one_precision(anchors, [artifacts[c] for c, _ in anchors], ("largest", "smallest"))
    costs.calibrate(anchors)
    if speedups:
        latency_budget = reference[0] / speedups[0]  # the loosest budget bounds the search

    cache: dict[tuple[int, ...], Candidate] = {}
    t0 = time.perf_counter()
    dims = space.dims()
    pop_n = settings.population
    bound = min(space.size(), 2 * pop_n + len(dims) + 5 + max(pop_n, pop_n // 3) + settings.generations * pop_n)

    def evaluate(genome: Sequence[int]) -> Candidate:
        key = space.canonical(genome)
        if key not in cache:
            tick()
            cfg = space.config(key)
            lat, mem = costs.latency_ms(cfg), costs.memory_mb(cfg)
            violation = 0.0
            if latency_budget is not None:
                violation += max(0.0, lat - latency_budget) / latency_budget
            if memory_budget is not None:
                violation += max(0.0, mem - memory_budget) / memory_budget
            cache[key] = Candidate(key, cfg, scorer(cfg), lat, mem, violation)
        return cache[key]

    with scoring_progress(bound) as tick:  # the subnets scored, of at most `bound`
        rng = random.Random(settings.seed)
        pop = seed_points(space, evaluate, latency_budget, max_evaluations=2 * settings.population)
        randoms = max(settings.population - len(pop), settings.population // 3)
        for _ in range(randoms):
            if len(cache) >= space.size():
                break
            pop.append(evaluate([rng.randrange(len(d.choices)) for d in dims]))
        pop = _select(list({id(c): c for c in pop}.values()), settings.population)
        for _ in range(settings.generations):
            children = []
            for _ in range(settings.population):
                a, b = _tournament(pop, rng), _tournament(pop, rng)
                child = [x if rng.random() < 0.5 else y for x, y in zip(a.genome, b.genome)]
                child = [rng.randrange(len(d.choices)) if rng.random() < settings.mutation else g
                         for g, d in zip(child, dims)]
                children.append(evaluate(child))
            union = list({c.genome: c for c in pop + children}.values())
            pop = _select(union, settings.population)
    seconds = time.perf_counter() - t0
    everything = list(cache.values())
    front = sorted(non_dominated_sort(everything)[0], key=lambda c: (c.latency_ms, -c.accuracy))
    feasible = [c for c in front if c.violation == 0.0]
    if not feasible:
        wanted = f"speed-up ≥ {speedups[-1]:g}x" if speedups else f"latency ≤ {latency_budget} ms"
        fastest = min(c.latency_ms for c in everything)
        best = f"{reference[0] / fastest:.2f}x" if speedups else f"{fastest:.3f} ms"
        raise InputError(
            f"no subnet fits the budgets ({wanted}, memory ≤ {memory_budget} MB); the smallest predicted is "
            f"{best} / {min(c.memory_mb for c in everything):.2f} MB — relax a budget or widen the space"
        )
    floor = None if metric is not None else fidelity_floor(profile)
    slots: list[tuple[float | None, list[Candidate]]]
    if len(speedups) > 1:
        slots = [(s * (1 - settings.speedup_tolerance), _most_accurate([c for c in feasible
                                                                        if c.latency_ms <= reference[0] / s]))
                 for s in reversed(speedups)]  # the strictest budget chooses first
    else:
        threshold = speedups[0] * (1 - settings.speedup_tolerance) if speedups else None
        slots = [(threshold, _spread_order(feasible, n, floor, settings.band))] * n
    finalists, rejected, tries = _finalists(
        net, costs, front, slots, n + settings.extra_tries, latency_budget, memory_budget,
        timed, example_inputs, kwargs, profile, example_batch, artifacts)
    settle_weights(finalists, scorer, scorer.calib)
    if settings.refit:
        refit_finalists(finalists, scorer, scorer.calib)
    timing: dict[str, Any] = {"mode": "speedup" if speedups else "absolute" if latency_budget is not None else "none",
                              "front_points_timed": tries, "max_front_points_timed": n + settings.extra_tries,
                              "scored_with": [scorer.label(s) for s in scorer.sources or scorer.candidates()[:1]],
                              "anchors": anchor_record}
    if clock is not None:
        timing |= {"speedup": list(speedups), "tolerance": settings.speedup_tolerance, **clock.summary()}
    return SearchResult(front, sorted(finalists, key=lambda f: f.predicted_latency_ms), rejected, len(cache), seconds,
                        costs.source, timing)


@contextlib.contextmanager
def scoring_progress(bound: int) -> Iterator[Callable[[], None]]:
    """A rich bar over the subnets the search scores (at most ``bound``), gone when scoring ends;
    yields the call that counts one."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]elastic.search: scoring subnets"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("at most,"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("scoring", total=bound)
        yield lambda: bar.advance(task)


def one_precision(anchors: list[tuple[SubnetConfig, float]], artifacts: Sequence[Any],
                  names: Sequence[str]) -> tuple[list[tuple[SubnetConfig, float]], dict[str, Any]]:
    """The predictor's anchors on one precision's line, and a record of each (precision, ms timed,
    ms the predictor uses).

    Anchors are timed as they ship, INT8 where it pays. Where one ships INT8 and another FP32 only
    because its INT8 engine missed the fidelity bounds (the INT8 engine was faster), the line through
    them mixes two precisions, the likely reason a MiniLM search once predicted 4.25 ms for
    finalists that measured 2.26 ms and judged near-full subnets infeasible. Such an FP32 anchor's time is
    divided by its own INT8 speed-up (``int8_speedup``: the fastest rejected INT8 mode's, timed in its
    lowering interleaved with the FP32 engine), so the line is INT8's; an anchor whose INT8 engine was
    not faster keeps its FP32 time, which is what would ship."""
    record: dict[str, Any] = {}
    mixed = len({art.precision for art in artifacts}) > 1
    out = []
    for (config, ms), art, name in zip(anchors, artifacts, names):
        speedup = art.latency_ms.get("int8_speedup")
        used = ms
        if mixed and art.precision == "fp32" and speedup is not None and speedup > 1:
            used = ms / speedup
        out.append((config, used))
        record[name] = {"precision": art.precision, "ms": ms, "predictor_ms": used}
    return out, record


def seed_points(space: ElasticSpace, evaluate: Callable[[Sequence[int]], Candidate], latency_budget: float | None,
                max_evaluations: int) -> list[Candidate]:
    """The search's first points besides random ones: the largest and the smallest subnet; every
    subnet one choice below the largest in a single dim (the light cuts a loose budget ships, which
    uniform random genomes almost never are: one cuts three in four of the dims); every dim at a
    quarter, half and three quarters of its choices; and, while the point reached is over the
    latency budget, a greedy descent from the largest that takes the one-choice cut losing the least
    accuracy per millisecond saved (at most ``max_evaluations`` subnets scored on the way).

    The descent is lazy (Minoux's accelerated greedy): each dim keeps the ratio its last cut
    measured, starting from the single cuts, and only the dim with the best ratio is re-measured
    from the current point; it is taken when it is still the best, so a step costs one or two
    subnets scored rather than one per dim.

    Measured on all-MiniLM-L6-v2 (12 elastic dims, Fisher nesting, before training): each single
    cut keeps cosine 0.96-0.998, yet with only the ends and random genomes to start from, the
    students of ``--speedup 1.3`` (a budget the full subnet meets) came out at 0.81 / 0.90 / 0.99;
    started from these points, 0.987 / 0.990 / 0.993 on held-out sentences."""
    import heapq

    dims = space.dims()
    full = [len(d.choices) - 1 for d in dims]

    def cut(genome: Sequence[int], i: int) -> list[int]:
        return [g - (j == i) for j, g in enumerate(genome)]

    def ratio(c: Candidate, here: Candidate) -> tuple[float, float] | None:
        """Accuracy lost per millisecond saved (a NaN accuracy counts as -1, ``objectives``), then
        the latency: among free cuts the largest saving first; None when the cut saves nothing."""
        saved = here.latency_ms - c.latency_ms
        return None if saved <= 0 else ((c.objectives()[0] - here.objectives()[0]) / saved, c.latency_ms)

    largest = evaluate(full)
    singles = {i: evaluate(cut(full, i)) for i in range(len(dims)) if full[i] > 0}
    points = [largest, evaluate([0] * len(dims)), *singles.values()]
    points += [evaluate([round(q * f) for f in full]) for q in (0.25, 0.5, 0.75)]
    heap = [(r, i) for i, c in singles.items() if (r := ratio(c, largest)) is not None]
    heapq.heapify(heap)
    current, spent = largest, 0
    while latency_budget is not None and current.latency_ms > latency_budget and heap and spent < max_evaluations:
        _, i = heapq.heappop(heap)
        if current.genome[i] == 0:
            continue
        step = evaluate(cut(current.genome, i))
        spent += 1
        r = ratio(step, current)
        if r is None:  # nothing saved here (a dropped block's expansion): the dim is done
            continue
        if heap and r > heap[0][0]:  # another dim's last ratio is better now: re-measure that one first
            heapq.heappush(heap, (r, i))
            continue
        current = step
        points.append(current)
        if current.genome[i] > 0:
            heapq.heappush(heap, (r, i))
    return list({c.genome: c for c in points}.values())


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (ends included)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _most_accurate(cands: Sequence[Candidate]) -> list[Candidate]:
    return sorted(cands, key=lambda c: (c.objectives()[0], c.latency_ms))


def _spread_order(feasible: list[Candidate], n: int, floor: float | None, band: float) -> list[Candidate]:
    """The front points to time, in order: ``n`` spread by latency over those within ``band`` of the
    best fidelity and at or above the floor (widening to the floor, then to the ``n`` most faithful,
    when fewer than ``n`` qualify), then the rest, most accurate first. Measured on digits: spreading
    over the whole front gave a 5x student at 0.84 test accuracy when 2x was asked and 2.6x ones
    reached 0.98; on EfficientNet-Lite0 with 20 photos, where no subnet reached the floor, it gave
    students 3.9x, 2.9x and 2.1x faster when 1.3x was asked."""
    best = -min(c.objectives()[0] for c in feasible)
    pool: list[Candidate] = []
    for low in (max(best - band, floor or 0.0), floor):
        pool = [c for c in feasible if low is None or c.objectives()[0] <= -low]
        if len(pool) >= n:
            break
    if len(pool) < n:
        pool = sorted(_most_accurate(feasible)[:n], key=lambda c: c.latency_ms)
    first = [pool[i] for i in _spread(len(pool), n)]
    return first + [c for c in _most_accurate(feasible) if c not in first]


def _finalists(net: Supernet, costs: CostModel, front: list[Candidate],
               slots: Sequence[tuple[float | None, list[Candidate]]], max_tries: int, latency_budget: float | None,
               memory_budget: float | None, timed: Callable[..., tuple[float, SpeedupReading | None]],
               example_inputs: tuple[Any, ...], kwargs: dict[str, Any], profile: Any, example_batch: int,
               artifacts: dict[SubnetConfig, Any]) -> tuple[list[Finalist], list[dict[str, Any]], int]:
    """Fill each slot ``(speed-up threshold, front points in order)`` with the first point that meets
    the budgets by measurement; no point is timed twice and at most ``max_tries`` are timed."""
    finalists: list[Finalist] = []
    rejected: list[dict[str, Any]] = []
    timed_configs: set[SubnetConfig] = set()
    for threshold, order in slots:
        for c in order:
            if len(timed_configs) >= max_tries:
                break
            if c.config in timed_configs:
                continue
            timed_configs.add(c.config)
            measured, reading = timed(c.config, f"finalist-{len(timed_configs) - 1}", threshold)
            module = extract(net, c.config).module  # BN statistics recalibrated for c by timed()
            mem = measured_memory_mb(module, tuple(example_inputs), kwargs, profile.precision, costs.batch, example_batch)
            over = []
            if reading is not None and not reading.meets:
                lo, hi = reading.iqr
                over.append(f"speed-up {reading.speedup:.2f}x (IQR {lo:.2f}-{hi:.2f}) < {threshold:.2f}x")
            elif reading is None and latency_budget is not None and measured > latency_budget:
                over.append(f"latency {measured:.3f} ms > {latency_budget} ms")
            if memory_budget is not None and mem > memory_budget:
                over.append(f"memory {mem:.3f} MB > {memory_budget} MB")
            timing = reading.to_dict() if reading is not None else None
            if over:
                rejected.append({**c.to_dict(), "measured_latency_ms": reading.ms if reading else measured,
                                 "measured_memory_mb": mem, "timing": timing, "why": "; ".join(over)})
                continue
            finalists.append(Finalist(c.config, module, c.accuracy, c.latency_ms,
                                      reading.ms if reading else measured, c.memory_mb, mem, front.index(c),
                                      artifacts.get(c.config), timing))
            break
    return finalists, rejected, len(timed_configs)
