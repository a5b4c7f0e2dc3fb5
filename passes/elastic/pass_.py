"""The elastic passes: ``elastic.nest``, ``elastic.train{...}``, ``elastic.search{...}``.

* ``elastic.nest`` nests the working student in place (every width a prefix, blocks ranked) and
  keeps the :class:`Supernet` in ``state.records["_elastic"]``;
* ``elastic.train`` trains it with the sandwich rule through ``DistillTrainer`` on
  ``state.train_data`` (checkpointed under ``state.work_dir`` when the state has one, so a re-run
  resumes);
* ``elastic.search`` runs NSGA-II under the profile's (or the given) budgets and replaces the
  supernet student with the measured finalists, each recording where it sits on the front; each
  ships with the trained weights or those before training, whichever is more faithful on the
  held-out batches (``keep``; its ``weights_check`` record says which, and the console says so when
  training is rejected).

Options are frozen and checked when built; an option that does not apply (``eps`` with a non-robust
loss) is an error, not ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from potstill.errors import InputError
from potstill.pipeline import Pass, PassResult, register_pass
from potstill.state import CompileState, Student

from .build import DEFAULT_RATIOS, choose_scores, make_supernet
from .search import SearchSettings
from .supernet import Supernet

_KEY = "_elastic"
ROBUST_LOSSES = ("rslad", "ard")
#: auto: cosine of mean-pooled outputs for an embedding teacher (kd on hidden states would be a
#: softmax over channels), kd on logits otherwise
LOSSES = ("auto", "kd", "cosine", *ROBUST_LOSSES)


def _ratios(name: str, values: Any) -> tuple[float, ...]:
    if not isinstance(values, tuple) or not values:
        raise ValueError(f"{name} must be a non-empty list of ratios, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < float(v) <= 1:
            raise ValueError(f"{name}: every ratio must lie in (0, 1], got {v!r}")
        out.append(float(v))
    return tuple(out)


def _positive(name: str, value: Any, kind: type = int, allow_none: bool = False, zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be {'>= 0' if zero else '> 0'}, got {value!r}")


def supernet_of(state: CompileState) -> Supernet:
    net = state.records.get(_KEY)
    if not isinstance(net, Supernet):
        raise InputError("no elastic supernet in this compilation: run elastic.nest first")
    return net


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NestOptions:
    #: widths offered for groups that cross blocks (fractions of the full width, aligned; None: full
    #: only where the supernet trains on fewer than 1,000 images, else ``DEFAULT_RATIOS``)
    width_ratios: tuple | None = None
    #: expansion ratios offered for groups inside one block (FFN / inverted-residual hidden)
    expansion_ratios: tuple = DEFAULT_RATIOS
    #: elastic depth per stage (importance-ranked blocks)
    depth: bool = True
    #: blocks every stage keeps at least
    min_depth: int = 1
    #: channel multiple to align widths to (None: the profile's, else 8)
    channel_multiple: int | None = None

    def __post_init__(self) -> None:
        if self.width_ratios is not None:
            object.__setattr__(self, "width_ratios", _ratios("width_ratios", self.width_ratios))
        object.__setattr__(self, "expansion_ratios", _ratios("expansion_ratios", self.expansion_ratios))
        if not isinstance(self.depth, bool):
            raise ValueError(f"depth must be true or false, got {self.depth!r}")
        _positive("min_depth", self.min_depth)
        _positive("channel_multiple", self.channel_multiple, allow_none=True)


@register_pass
class ElasticNestPass(Pass):
    """Sort every elastic group by importance (the working student's scores, else L2 magnitude)
    and permute the weights in place; the network's output does not change."""

    name: ClassVar[str] = "elastic.nest"
    Options: ClassVar[type] = NestOptions
    ensures: ClassVar[frozenset[str]] = frozenset({"elastic"})
    collective = True  # under torchrun every rank needs the supernet's structure to train it

    def run(self, state: CompileState) -> PassResult:
        from potstill.passes.distill.pass_ import note
        from potstill.passes.importance.base import calibration_batches
        from potstill.passes.prune.align import channel_multiple

        o: NestOptions = self.options
        student = state.working()
        multiple = channel_multiple(state.profile, o.channel_multiple or 0)
        key = f"{self.spec()}@{multiple}"  # the multiple the widths are aligned to: one supernet per value
        shared = state.shared.passes.get(_KEY, {}).get(key)
        if isinstance(shared, Supernet):  # another device's plan built it: one supernet for all
            student.module = shared.model
            self._keep(state, shared)
            return PassResult(state, True)
        scores = student.importance if "importance" in state.facts and student.importance else None
        choose = scores is None and getattr(state, "calib_data", None) is not None and state.heldout_data is not None
        calib = calibration_batches(state) if o.depth or choose else None
        batches = calib if o.depth else None
        width_ratios = self._width_ratios(state)
        chosen: dict[str, Any] | None = None
        if choose:
            scores, chosen = choose_scores(
                student.module, state.teacher, state.example_inputs, state.example_kwargs,
                calib or [], _heldout(state), width_ratios=width_ratios,
                expansion_ratios=o.expansion_ratios, multiple=multiple, analysis=state.analysis(student))
            note(f"elastic.nest: channels nested by {chosen['chosen']} importance, the most faithful probe subnet on "
                 "held-out data (" + ", ".join(f"{n} {f:.3g}" for n, f in chosen["probe_fidelity"].items()) + ")")
        net = make_supernet(
            student.module, state.example_inputs, state.example_kwargs, scores=scores, batches=batches,
            width_ratios=width_ratios, expansion_ratios=o.expansion_ratios, depth=o.depth, min_depth=o.min_depth,
            multiple=multiple, analysis=state.analysis(student),
        )
        if not net.space.dims():
            raise InputError(
                "elastic.nest: nothing in this model can be elastic; "
                + "; ".join(f"g{g}: {why}" for g, why in list(net.space.fixed.items())[:5])
            )
        if chosen is not None:
            net.record.importance = chosen
        state.shared.passes.setdefault(_KEY, {})[key] = net
        self._keep(state, net)
        return PassResult(state, True)

    def _width_ratios(self, state: CompileState) -> tuple[float, ...]:
        """As given; by default full where the supernet trains on a few photos: 250 sandwich steps on
        them cannot re-learn a pretrained network's narrower residual stream (EfficientNet-Lite0: with
        every width at its median the subnet agreed with the teacher on none of 32 held-out crops
        before training, whichever BatchNorm statistics it ran with), so, as in Once-for-All's
        MobileNetV3 space, only expansion widths and depth are elastic there."""
        from potstill.passes.distill.augment import few_images
        from potstill.passes.distill.pass_ import note

        if self.options.width_ratios is not None:
            return tuple(self.options.width_ratios)
        images = few_images(state.train_data)
        if not images:
            return DEFAULT_RATIOS
        note(f"elastic.nest: {images} training images: the widths that cross blocks (stem, residual stream, "
             "heads) stay full and expansion widths and depth are elastic, as a few photos cannot re-learn a "
             "narrower residual stream (elastic.nest{width_ratios=[...]} makes them elastic)")
        return (1.0,)

    @staticmethod
    def _keep(state: CompileState, net: Supernet) -> None:
        state.records[_KEY] = net
        state.records["elastic"] = {"space": net.space.to_dict(), "nesting": net.record.to_dict()}
        state.facts.add("elastic")


# ---------------------------------------------------------------------------------------------


#: sandwich steps of ``elastic.train`` when no epochs are given: a supernet trains every subnet at once
#: and needs more steps than one distilled student (measured on digits: 69 steps left the small subnets
#: at 0.2-0.5 top-1 agreement)
DEFAULT_STEPS = 250


@dataclass(frozen=True)
class TrainOptions:
    #: passes over the data (None: as many as ``DEFAULT_STEPS`` steps take, at least one; with
    #: ``minutes``, until the budget is spent)
    epochs: int | None = None
    max_steps: int | None = None
    #: wall-clock budget of the training, in minutes (None: none); the learning rate and the
    #: progressive unlocking follow the budget's fraction spent when that is ahead of the steps
    minutes: float | None = None
    #: None: ``PRETRAINED_LR`` for a transformer teacher (its output an embedding or next-token
    #: logits), else 1e-3 (see ``default_lr``)
    lr: float | None = None
    #: auto | kd (in-place KD on logits) | cosine (embeddings) | rslad | ard (robust supernet, ProARD)
    loss: str = "auto"
    #: random subnets per step besides the largest and the smallest (sandwich rule)
    random_subnets: int = 2
    #: unlock width, then depth, then expansion (OFA)
    progressive: bool = True
    #: AmoebaLLM loss balancing (None: only when there is no teacher; see elastic.train's docs)
    balance: bool | None = None
    #: KD temperature (kd and ard; None: 1)
    temperature: float | None = None
    #: PGD radius and steps (robust losses only)
    eps: float | None = None
    pgd_steps: int | None = None
    #: new random crops, flips and colour jitter of the training images each step, seen alike by the
    #: teacher (label-free; ``potstill.passes.distill.augment``). None: when the training batches are
    #: fewer than 1,000 images (a few photos), as ``distill`` does
    augment: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.augment is not None and not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true or false, got {self.augment!r}")
        _positive("epochs", self.epochs, allow_none=True)
        _positive("max_steps", self.max_steps, allow_none=True)
        _positive("minutes", self.minutes, float, allow_none=True)
        if self.minutes is not None and not math.isfinite(self.minutes):
            raise ValueError(f"minutes must be a finite number, got {self.minutes!r}")
        _positive("lr", self.lr, float, allow_none=True)
        _positive("temperature", self.temperature, float, allow_none=True)
        if self.loss == "cosine" and self.temperature is not None:
            raise ValueError("temperature applies to kd and ard, not loss=cosine")
        _positive("random_subnets", self.random_subnets, zero=True)
        _positive("seed", self.seed, zero=True)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        robust = self.loss in ROBUST_LOSSES
        for name in ("eps", "pgd_steps"):
            if getattr(self, name) is not None and not robust:
                raise ValueError(f"{name} applies to the robust losses ({', '.join(ROBUST_LOSSES)}) only, "
                                 f"not loss={self.loss}")
        _positive("eps", self.eps, float, allow_none=True)
        _positive("pgd_steps", self.pgd_steps, allow_none=True)
        if not isinstance(self.progressive, bool):
            raise ValueError(f"progressive must be true or false, got {self.progressive!r}")
        if self.balance is not None and not isinstance(self.balance, bool):
            raise ValueError(f"balance must be true or false, got {self.balance!r}")

    def loss_options(self, loss: str | None = None) -> dict[str, Any]:
        loss = loss or self.loss
        temperature = 1.0 if self.temperature is None else self.temperature
        if loss == "kd":
            return {"temperature": temperature}
        if loss == "cosine":
            if self.temperature is not None:
                raise InputError("elastic.train: the teacher's output is an embedding, so loss=auto trains with "
                                 "cosine, which has no temperature; drop temperature= (or give loss=kd)")
            return {}
        from potstill.passes.distill.robust import eps_options

        opts = eps_options(self.eps if self.eps is not None else 8 / 255, self.pgd_steps or 10)
        return opts | ({"temperature": temperature} if loss == "ard" else {})


@register_pass
class ElasticTrainPass(Pass):
    """Train every subnet at once (sandwich rule, in-place distillation, balancing, progressive)."""

    name: ClassVar[str] = "elastic.train"
    Options: ClassVar[type] = TrainOptions
    requires: ClassVar[frozenset[str]] = frozenset({"elastic"})
    collective = True  # under torchrun every rank trains (DDP)

    def run(self, state: CompileState) -> PassResult:
        from potstill.passes.distill import TrainConfig
        from potstill.passes.distill.augment import AugmentedImages, few_images, image_count, wants_augment
        from potstill.passes.distill.pass_ import note

        from .train import train_supernet

        o: TrainOptions = self.options
        if state.train_data is None:
            raise InputError("elastic.train needs training data: give --data FILE.py:FN (or a teacher file "
                             "with train_data)")
        net = supernet_of(state)
        student = state.working()
        if net.model is not student.module:  # under torchrun rank 0 broadcast its supernet into this rank
            net.rebind(student.module)
        done = net.trained.get(self.spec())
        if done is not None:  # trained by another device's plan of this compilation
            state.records.setdefault("elastic", {})["training"] = {**done, "reused": True}
            state.facts.add("distilled")
            return PassResult(state, False)
        work = getattr(state, "work_dir", None)
        ckpt = work / "checkpoints" / "supernet" if work is not None else None
        epochs, max_steps = o.epochs, o.max_steps
        if epochs is None and o.minutes is not None and max_steps is None:
            from potstill.passes.distill.pass_ import UNTIL_BUDGET

            epochs = UNTIL_BUDGET
        elif epochs is None:  # a step budget: whole epochs up to DEFAULT_STEPS (or max_steps)
            from potstill.passes.distill.batches import count_batches

            steps = max_steps or DEFAULT_STEPS
            epochs = max(1, -(-steps // max(count_batches(state.train_data, o.seed), 1)))
            max_steps = steps
        task = _teacher_task(state)
        lr = o.lr if o.lr is not None else default_lr(task)
        cfg = TrainConfig(epochs=epochs, max_steps=max_steps, lr=lr, seed=o.seed, progress_label="elastic.train",
                          time_budget_s=o.minutes * 60 if o.minutes is not None else None,
                          checkpoint_dir=ckpt, resume=ckpt is not None, checkpoint_every=50 if ckpt else 0)
        loss = ("cosine" if task == "embedding" else "kd") if o.loss == "auto" else o.loss
        if loss not in ROBUST_LOSSES:  # robust training trades clean fidelity by design: not checked
            net.keep_untrained()
        data: Any = state.train_data
        augmented = wants_augment(data, o.augment, "elastic.train")
        # as the default distillation: a few photos misdescribe the statistics the teacher's BatchNorm learnt
        batchnorm = "frozen" if few_images(data) else "train"
        cfg = replace(cfg, batchnorm=batchnorm)
        if augmented:
            data = AugmentedImages(data, o.seed)
            note(f"elastic.train: the {image_count(state.train_data)} training images are augmented (new random crops, "
                 "flips and colour jitter every step, the teacher seeing the same view); augment=false or "
                 "--no-augment trains on them as given")
        result = train_supernet(net, state.teacher, data, cfg, loss=loss,
                                random_subnets=o.random_subnets, progressive=o.progressive, balance=o.balance,
                                **o.loss_options(loss))
        training = {"loss": loss, "lr": lr, "augmented": augmented, "batchnorm": batchnorm, "steps": result.steps,
                    "final_loss": result.loss, "seconds": result.seconds, "budget_minutes": o.minutes,
                    "stopped_by_budget": result.stopped_by_budget, "resumed_from": result.resumed_from,
                    **({"pgd": o.loss_options()} if o.loss in ROBUST_LOSSES else {})}
        if result.stopped_by_budget:
            note(f"elastic.train: the {o.minutes:g}-minute budget stopped training after {result.steps} sandwich steps "
                 f"({result.seconds / 60:.1f} min)")
        net.trained[self.spec()] = training
        state.records.setdefault("elastic", {})["training"] = training
        state.facts.add("distilled")
        return PassResult(state, True)


#: sandwich lr for a pretrained transformer: measured on all-MiniLM-L6-v2 (120 steps, held-out cosine of
#: the full subnet / depth 4 / depth 3 of 6): 1e-3 left the full subnet at 0.63 after 60 steps, 1e-4 at
#: 0.93; 3e-5 kept it at 0.97 and lifted depth 4 from 0.84 to 0.87 and depth 3 from 0.62 to 0.68
PRETRAINED_LR = 3e-5


def default_lr(task: str) -> float:
    """``elastic.train``'s lr when none is given: ``PRETRAINED_LR`` for an embedding or language-model
    teacher (a pretrained transformer, which AdamW at 1e-3 moves off its solution within a few
    steps; ``potstill.passes.distill.defaults``), else 1e-3 (small CNNs)."""
    return PRETRAINED_LR if task in ("embedding", "causal_lm") else 1e-3


def _teacher_task(state: CompileState) -> str:
    """The fidelity task of the teacher's output (``potstill.fidelity.infer_task``): ``embedding``
    trains with cosine, the rest with kd."""
    import torch
    from potstill.fidelity import infer_task

    with torch.no_grad():
        out = state.teacher(*state.example_inputs, **(state.example_kwargs or {}))
    return infer_task(state.teacher, state.hf, out)



# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchOptions(SearchSettings):
    """``SearchSettings`` (students, budgets, population, generations, mutation, seed) and the device."""

    #: the device to search for (a built-in profile name or a YAML path; None: the compile's profile).
    #: Several searches on one supernet give students for several devices.
    profile: str | None = None

    def __post_init__(self) -> None:
        _positive("students", self.students, allow_none=True)
        if self.profile is not None and (not isinstance(self.profile, str) or not self.profile):
            raise ValueError(f"profile must be a profile name or path, got {self.profile!r}")
        _positive("latency_ms", self.latency_ms, float, allow_none=True)
        _positive("memory_mb", self.memory_mb, float, allow_none=True)
        if self.speedup is not None:
            values = self.speedup if isinstance(self.speedup, tuple) else (self.speedup,)
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v < float("inf"):
                    raise ValueError(f"speedup: every budget must be a finite number >= 1 (times faster than the "
                                     f"teacher), got {v!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"speedup: budgets must be distinct, got {list(values)}")
            object.__setattr__(self, "speedup", tuple(float(v) for v in values))
            if self.latency_ms is not None:
                raise ValueError("speedup and latency_ms: give a relative or an absolute latency budget, not both")
        tol = self.speedup_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 0.5:
            raise ValueError(f"speedup_tolerance must lie in [0, 0.5), got {tol!r}")
        _positive("timing_rounds", self.timing_rounds)
        _positive("max_timing_rounds", self.max_timing_rounds)
        if self.max_timing_rounds < self.timing_rounds:
            raise ValueError(f"max_timing_rounds ({self.max_timing_rounds}) must be >= timing_rounds ({self.timing_rounds})")
        _positive("extra_tries", self.extra_tries, zero=True)
        if isinstance(self.band, bool) or not isinstance(self.band, (int, float)) or not 0 <= self.band <= 1:
            raise ValueError(f"band must lie in [0, 1], got {self.band!r}")
        _positive("population", self.population)
        if self.population < 2:
            raise ValueError(f"population must be >= 2, got {self.population}")
        _positive("generations", self.generations, zero=True)
        _positive("seed", self.seed, zero=True)
        if isinstance(self.mutation, bool) or not isinstance(self.mutation, (int, float)) or not 0 <= self.mutation <= 1:
            raise ValueError(f"mutation must lie in [0, 1], got {self.mutation!r}")
        if not isinstance(self.refit, bool):
            raise ValueError(f"refit must be true or false, got {self.refit!r}")


def _robustness(state: CompileState, module: Any) -> dict[str, Any]:
    """Clean and PGD-20 accuracy of a student of a robust supernet on the labelled evaluation data
    (at the training radius); nothing for a plain supernet, a note when there are no labels."""
    pgd = state.records.get("elastic", {}).get("training", {}).get("pgd")
    if pgd is None:
        return {}
    from potstill.passes.distill.robust import PGDConfig, robust_accuracy

    if state.eval_data is None:
        return {"robust_accuracy": None, "robust_note": "no labelled evaluation data (--eval) to attack"}
    cfg = PGDConfig(eps=pgd["eps"], step_size=pgd["step_size"], steps=20)
    try:
        return {**robust_accuracy(module, state.eval_data, cfg), "pgd_eval": {"eps": cfg.eps, "steps": 20}}
    except InputError as e:
        return {"robust_accuracy": None, "robust_note": str(e)}


def _heldout(state: CompileState) -> list[Any]:
    from potstill.inputs.data import iter_batches
    from potstill.passes.importance.base import calibration_batches, warn

    source = getattr(state, "heldout_data", None) or state.eval_data
    if source is not None:
        batches = list(iter_batches(source, 32))
        if batches:
            return batches
    warn("elastic.search: no held-out data; subnets are scored on the calibration batches, which also "
         "set their BatchNorm statistics — the scores are optimistic")
    return calibration_batches(state)


@register_pass
class ElasticSearchPass(Pass):
    """NSGA-II under the profile's latency and memory budgets; emits measured finalists as students."""

    name: ClassVar[str] = "elastic.search"
    Options: ClassVar[type] = SearchOptions
    requires: ClassVar[frozenset[str]] = frozenset({"elastic"})

    def run(self, state: CompileState) -> PassResult:
        from potstill.passes.importance.base import calibration_batches, warn
        from potstill.profiles import load_profile

        from .score import SOURCE_ORDER
        from .search import search

        o: SearchOptions = self.options
        net = supernet_of(state)
        profile = load_profile(o.profile if o.profile is not None else (state.profile or "cpu"))
        work = getattr(state, "work_dir", None)
        result = search(
            net, state.teacher, profile, state.example_inputs, state.example_kwargs, _heldout(state),
            calibration_batches(state), o, metric=state.metric,
            work_dir=work / "elastic-search" / profile.name if work is not None else None,
        )
        if not result.finalists:
            raise InputError(
                f"elastic.search: every front point was over budget when measured on {profile.name} "
                f"({'; '.join(r['why'] for r in result.rejected[:3])}); relax the budgets"
            )
        scored_with = result.timing.get("scored_with") or []
        default = (SOURCE_ORDER[0].label(), SOURCE_ORDER[0].label(batchnorm=False))  # with and without BatchNorm
        if len(scored_with) > 1 or (scored_with and scored_with[0] not in default):
            warn(f"elastic.search on {profile.name}: the largest, the middle and the smallest subnet were most "
                 f"faithful on held-out data with {' or '.join(scored_with)}, so subnets were ranked with "
                 f"{'those' if len(scored_with) == 1 else 'the best of them per subnet'} (by default the search "
                 "ranks with the trained weights, any BatchNorm statistics re-estimated per subnet)")
        # the supernet is not a deliverable: the first search replaces it, later ones (other devices) add
        supernet_student = next((s for s in state.students if "elastic" not in s.metrics), None)
        front = [{"accuracy": c.accuracy, "latency_ms": c.latency_ms, "memory_mb": c.memory_mb} for c in result.front]
        shortfall = _shortfall(result, o.wanted)
        students = []
        for i, f in enumerate(result.finalists):
            history = supernet_student.history if supernet_student is not None else []
            s = Student(f"{profile.name}-elastic{i}", f.module, history=list(history))
            s.metrics["elastic"] = f.to_dict() | {"profile": profile.name, "front": front} | _robustness(state, f.module)
            check = f.weights_check
            if check is not None and check["kept"] == "untrained":
                s.history.append("elastic.search: training rejected for this subnet on held-out data")
                warn(f"elastic.search: {s.name}: the supernet's training lowered this subnet's held-out fidelity "
                     f"({check['untrained']:.4g} before training, {check['trained']:.4g} after), so it ships with "
                     "the weights before training (the nested teacher's)")
            if f.refit is not None and f.refit["kept"]:
                base = " from the weights before training" if f.refit["weights"] == "untrained" else ""
                s.history.append(f"elastic.search: {f.refit['layers']} layers refitted by least squares toward the "
                                 f"teacher{base} (held-out fidelity {f.refit['before']:.4g} -> {f.refit['after']:.4g})")
            if check is not None and check["statistics"] == "stored":
                s.history.append("elastic.search: BatchNorm statistics kept as stored (re-estimation rejected on "
                                 "held-out data)")
            if shortfall is not None:
                s.metrics["elastic"]["shortfall"] = shortfall
            if result.timing:
                s.metrics["elastic"]["search_timing"] = result.timing
            s.metrics["elastic"]["search_cost"] = {"subnets_scored": result.evaluated, "scoring_seconds": result.seconds}
            training = state.records.get("elastic", {}).get("training")
            if training is not None:  # the supernet's training, as every student of it has it
                s.metrics["elastic"]["training"] = training
            students.append(s)
        state.students = [s for s in state.students if s is not supernet_student] + students
        record = state.records.setdefault("elastic", {})
        record.setdefault("searches", {})[profile.name] = result.to_dict()
        return PassResult(state, True)


def _shortfall(result: Any, requested: int) -> dict[str, Any] | None:
    """Why the search emitted fewer students than ``--students`` asked for (None when it did not)."""
    emitted = len(result.finalists)
    if emitted >= requested:
        return None
    feasible = sum(1 for c in result.front if c.violation == 0.0)
    why = []
    if feasible < requested:
        why.append(f"the Pareto front holds {len(result.front)} distinct subnets, {feasible} within the budgets")
    if result.rejected:
        why.append(f"{len(result.rejected)} over a budget when measured ({result.rejected[0]['why']})")
    timed, bound = result.timing.get("front_points_timed"), result.timing.get("max_front_points_timed")
    if timed is not None and timed >= bound:
        why.append(f"the measurement bound was reached ({timed} front points timed)")
    return {"requested": requested, "emitted": emitted, "why": "; ".join(why) or "no further front point"}
