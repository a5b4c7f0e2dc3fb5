"""The ``distill`` pass: the working student learns from the teacher on the training data.

``prune.width{ratio=0.5},distill{method=kd,epochs=3,temperature=2}``. ``method`` alone chooses
the objective and regime (``kd``, ``hidden``, ``attention``, ``cosine`` or a sum such as
``kd+hidden``; ``ard``, ``rslad``, ``adaspec``, ``cema``), and each method takes only its own
options: see ``methods`` for the table. An option of another method is an error listing this
method's options; ``loss=`` is an error that says which ``method=`` to write.

Training options (every method): epochs, minutes, max_steps, lr, lr_probe, probe_steps, batch_size,
optimizer, weight_decay, warmup_steps, grad_clip, precision, checkpoint_every, resume, eval_limit, progress,
divergence_factor, parallel, augment, dropout, batchnorm, check. ``None`` means "not set" (no step limit, the data's own batches, no clipping).

``lr_probe=[a,b,...]`` (instead of ``lr``; see ``lr_probe``): each candidate trains a few steps
(at most ``probe_steps``) from the same start, the held-out batches pick the one with the lowest loss,
and training goes on from its weights and optimizer state at its lr; the probe counts against
``minutes`` and the planned steps. The metrics record ``lr`` and ``lr_probe`` (the candidates'
held-out losses), and the console says which lr won. Without held-out batches, or with too few
planned steps, there is no probe: the first candidate trains, and the record says why. The default
pipeline probes a pretrained teacher's lr (``defaults``); ``lr`` alone trains at it, with no probe.

``check``: training is kept only when it lowers the student's loss on the held-out batches
(``state.heldout_data``, never trained on; KL to the teacher's logits, else relative error: see
``potstill.passes.prune.heldout``); otherwise the student before training is put back and the console
says so. A few photos trained on for minutes can overfit: EfficientNet-Lite0 distilled for 10 minutes
on 20 photos agreed with its teacher on 0.60 of held-out crops, 0.70 before. ``None``: checked where
there are held-out batches and the method is not a robust one (``ard`` and ``rslad`` trade clean
fidelity for robustness by design); ``true``: always (an error without held-out batches);
``false``: never.

``minutes``: a wall-clock budget (``budget``): training stops when it is spent, and the learning
rate decays over it; ``epochs`` then bounds the run too, and without ``epochs`` it trains until
the budget is spent. The metrics record the minutes used and whether the budget stopped the run.
``augment`` (``augment``): each step sees new random crops, flips and colour jitter of the
training images, teacher and student the same view; ``None`` turns it on when the batches are
images ``[N, C, H, W]``, fewer than ``AUGMENT_BELOW`` (1,000) of them, and the teacher runs live;
``false`` turns it off; ``true`` on data without images is an error.

``parallel`` (under ``torchrun``): ``auto`` (DDP when launched with several processes, else one
process), ``ddp``, or ``fsdp`` — FSDP2 (``fully_shard``) for a student whose weights, gradients and
optimizer state do not fit one device: each rank holds ``1/world`` of them, the teacher stays whole
and frozen, and the trained student comes back whole on every rank (see ``fsdp``). ``ddp`` and
``fsdp`` outside torchrun are an error, raised when the options are read, before any work.

``teacher_outputs``: ``live`` (default: the teacher runs beside the student every step) or
``cached`` — for a teacher that cannot sit beside the student: before training it runs once over
exactly the batches the steps will see (every epoch's order, up to ``max_steps``) and its outputs go
to one safetensors file per batch (see ``teacher_cache``); training reads them and the teacher never
moves to the training device. Full outputs train exactly as the live teacher does;
``teacher_top_k=K`` keeps only the top ``K`` logits per position (values and indices, the rest read
back as a tail ``TAIL_GAP`` below them: the renormalised top-``K`` distribution), for large
vocabularies. The cache lives under ``state.work_dir / "teacher-cache"`` (a re-run with the
same teacher and data reuses it), else in a temporary folder the pass removes afterwards.
``method=attention`` needs the live teacher (the cache keeps no attention maps), and so do augmented
images (every step's view is new). The cache is shared by the students of one compile: its folder
is named by the teacher's weights, top-k and what is captured, and each file by its batch. Under
``minutes`` the steps are not known in advance, so the cache fills as training meets each batch.

Data: ``state.train_data``, else ``state.calib_data``. Metrics go to ``student.metrics["distill"]``
with the method and every option as it ran. Checkpoints (safetensors + JSON) and a JSON-lines log
go to ``state.work_dir / "checkpoints" / <student>`` — never into the student's output folder —
once per epoch (or every ``checkpoint_every`` steps); a re-run with the same inputs resumes from
the last one (``resume=false`` starts afresh). Without a work folder there are no checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.errors import InputError
from potstill.pipeline import Pass, PassResult, register_pass
from potstill.state import CompileState

from . import checkpoint as ckpt
from . import methods
from .augment import AugmentedImages, few_images, wants_augment
from .batches import Rebatched
from .capture import Want
from .config import PARALLEL, StudentSpec, TrainConfig, not_launched, step_batches
from .distributed import launched_distributed
from .losses import DistillLoss, make_loss
from .lr_probe import PROBE_STEPS, ProbeResult, probe_lr, probe_steps
from .methods import require, typed_fields
from .teacher_cache import TeacherCache, remove_teacher_caches
from .trainer import DistillTrainer

METHODS = methods.METHODS
TEACHER_OUTPUTS = ("live", "cached")
#: methods whose loss reads teacher outputs the cache does not store (attention maps)
NEEDS_LIVE_TEACHER = frozenset({"attention"})


@dataclass(frozen=True)
class DistillOptions:
    """Training options, then every method's options (``None``: not given, the method's default)."""

    method: str = "kd"
    #: passes over the data (None: 1, or as many as ``minutes`` allows when it is given)
    epochs: int | None = None
    #: wall-clock budget of the training, in minutes (None: no budget)
    minutes: float | None = None
    max_steps: int | None = None
    #: the learning rate (None: 1e-3, or the one lr_probe chooses)
    lr: float | None = None
    #: candidate learning rates tried on the held-out batches before training (None: train at lr)
    lr_probe: tuple[float, ...] | None = None
    #: steps each candidate of lr_probe trains at most (None: lr_probe.PROBE_STEPS)
    probe_steps: int | None = None
    batch_size: int | None = None
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    checkpoint_every: int | None = None
    resume: bool | None = None
    eval_limit: int | None = None
    progress: bool = True
    divergence_factor: float | None = 10.0
    parallel: str = "auto"
    #: live: the teacher runs every step; cached: its outputs are computed once, stored, read back
    teacher_outputs: str = "live"
    #: with cached: keep only the top K logits per position (None: the whole output)
    teacher_top_k: int | None = None
    #: random resized crops, flips and colour jitter of image batches (None: on for fewer than 1,000 images)
    augment: bool | None = None
    #: the student's dropout while it trains (off by default: it learns to match a teacher that runs
    #: without dropout; on, it also learns to be robust to it, at the cost of that match)
    dropout: bool = False
    #: the student's BatchNorm while it trains: train (batch statistics, running ones updated) or frozen
    #: (the running statistics as they are; None: frozen on fewer than AUGMENT_BELOW training images,
    #: whose statistics misdescribe what a pretrained teacher saw, else train)
    batchnorm: str | None = None
    #: keep the training only when it lowers the held-out loss (None: where there are held-out batches, non-robust methods)
    check: bool | None = None
    # -- method options (see methods.py; each applies to the methods listed there) --
    temperature: float | None = None
    alpha: float | None = None
    project: bool | None = None
    student_modules: tuple[str, ...] | None = None
    teacher_modules: tuple[str, ...] | None = None
    attention_kind: str | None = None
    pooling: str | None = None
    mse_weight: float | None = None
    eps: float | None = None
    pgd_steps: int | None = None
    eval_pgd_steps: int | None = None
    clamp: bool | None = None
    input_min: float | None = None
    input_max: float | None = None
    adv_weight: float | None = None
    k: float | None = None
    ref_steps: int | None = None
    entropy_fraction: float | None = None

    def __post_init__(self) -> None:
        typed_fields(self, "distill")
        checks = [
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1 (or null: 1, or until minutes are spent), got {self.epochs}"),
            (self.minutes is None or self.minutes > 0, f"minutes must be > 0 (or null: no time budget), got {self.minutes}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 (or null: no limit), got {self.max_steps}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.optimizer in ("adamw", "sgd"), f"optimizer must be adamw or sgd, got {self.optimizer!r}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 (or null: no clipping), got {self.grad_clip}"),
            (self.precision in ("fp32", "bf16", "fp16"), f"precision must be fp32, bf16 or fp16, got {self.precision!r}"),
            (self.checkpoint_every is None or self.checkpoint_every >= 1,
             f"checkpoint_every must be >= 1 (or null: once per epoch), got {self.checkpoint_every}"),
            (self.eval_limit is None or self.eval_limit >= 1, f"eval_limit must be >= 1, got {self.eval_limit}"),
            (self.divergence_factor is None or self.divergence_factor > 1,
             f"divergence_factor must be > 1 (or null: do not check), got {self.divergence_factor}"),
            (self.parallel in PARALLEL, f"parallel must be one of {', '.join(PARALLEL)}, got {self.parallel!r}"),
            (self.batchnorm in (None, "train", "frozen"),
             f"batchnorm must be train or frozen (or null: frozen on a few images), got {self.batchnorm!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            require(ok, "distill", message)
        require(self.parallel == "auto" or launched_distributed(), "distill", not_launched(self.parallel))
        self._check_lr_probe()
        self._check_teacher_outputs()
        self.method_options()  # checks the method and its options now, not when training starts

    def _check_lr_probe(self) -> None:
        if self.lr_probe is None:
            require(self.probe_steps is None, "distill",
                    f"probe_steps={self.probe_steps} applies to lr_probe only; add lr_probe=[...] or drop probe_steps")  # fmt: skip
            return
        require(self.lr is None, "distill",
                f"lr={self.lr} and lr_probe={list(self.lr_probe)} both given: lr_probe chooses the lr; keep one")  # fmt: skip
        require(len(self.lr_probe) >= 2 and all(lr > 0 for lr in self.lr_probe), "distill",
                f"lr_probe must list two or more learning rates > 0, got {list(self.lr_probe)}")  # fmt: skip
        require(len(set(self.lr_probe)) == len(self.lr_probe), "distill",
                f"lr_probe lists a learning rate twice: {list(self.lr_probe)}")  # fmt: skip
        require(self.probe_steps is None or self.probe_steps >= 1, "distill",
                f"probe_steps must be >= 1 (or null: {PROBE_STEPS}), got {self.probe_steps}")  # fmt: skip

    @property
    def run_lr(self) -> float:
        """The learning rate when no probe chooses it: as given, else the pass's default."""
        return DEFAULT_LR if self.lr is None else self.lr

    def _check_teacher_outputs(self) -> None:
        require(self.teacher_outputs in TEACHER_OUTPUTS, "distill",
                f"teacher_outputs must be {' or '.join(TEACHER_OUTPUTS)}, got {self.teacher_outputs!r}")  # fmt: skip
        if self.teacher_top_k is not None:
            require(self.teacher_outputs == "cached", "distill",
                    f"teacher_top_k={self.teacher_top_k} applies to cached teacher outputs only; add "
                    "teacher_outputs=cached or drop teacher_top_k")  # fmt: skip
            require(self.teacher_top_k >= 1, "distill",
                    f"teacher_top_k must be >= 1 (or null: keep the whole output), got {self.teacher_top_k}")  # fmt: skip
        require(self.teacher_outputs == "live" or self.augment is not True, "distill",
                "augment=true needs teacher_outputs=live: the teacher must see each step's new view of the images, "
                "which no cache holds; use teacher_outputs=live, or augment=false")  # fmt: skip
        live_only = [p for p in methods.parse_method(self.method) if p in NEEDS_LIVE_TEACHER]
        require(self.teacher_outputs == "live" or not live_only, "distill",
                f"method={self.method} needs teacher_outputs=live: {', '.join(live_only)} matches the teacher's "
                "attention maps, which the teacher cache does not keep; use teacher_outputs=live, or a method "
                f"that reads logits or hidden states ({', '.join(m for m in METHODS if m not in NEEDS_LIVE_TEACHER)})")  # fmt: skip

    def given_method_options(self) -> dict[str, Any]:
        names = methods.all_method_option_names()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in names and getattr(self, f.name) is not None}  # fmt: skip

    def method_options(self) -> dict[str, Any]:
        """Each part of the method with its options object (defaults filled in)."""
        return methods.build(self.method, self.given_method_options())

    @property
    def run_epochs(self) -> int:
        """The epochs bound of the run: as given, else 1, else (with ``minutes``) until the budget ends."""
        if self.epochs is not None:
            return self.epochs
        return UNTIL_BUDGET if self.minutes is not None else 1


#: the learning rate without lr or lr_probe (suits small networks trained from scratch or pruned)
DEFAULT_LR = 1e-3
#: the epochs bound of a run that trains until its time budget is spent
UNTIL_BUDGET = 1_000_000
NO_DATA = (
    "distill needs training data: pass --data FILE.py:FN (a function returning an iterable of "
    "batches: tensors, (inputs, labels) pairs or dicts of model inputs)"
)


@register_pass
class DistillPass(Pass):
    """Distil the working student from the teacher (see the module docstring)."""

    name = "distill"
    Options = DistillOptions
    ensures = frozenset({"distilled"})
    collective = True  # under torchrun every rank trains

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if "loss" in kwargs:
            loss = kwargs["loss"]
            fix = f"write distill{{method={loss}}}" if _is_method(loss) else f"methods: {', '.join(METHODS)}"
            also = f" and drop loss={loss}" if "method" in kwargs else ""
            raise InputError(
                f"distill: there is no 'loss' option: 'method' alone chooses what the student learns "
                f"(one word, so the two cannot disagree); {fix}{also}"
            )
        super().__init__(options, **kwargs)

    def _checkpoint_dir(self, state: CompileState, name: str) -> Path | None:
        o = self.options
        work = getattr(state, "work_dir", None)  # CompileState.work_dir: the driver's per-OUT work area
        if work is None:
            asked = [k for k, v in (("checkpoint_every", o.checkpoint_every), ("resume", o.resume)) if v]
            require(not asked, "distill", f"{', '.join(asked)} given, but this compile has no work folder for "
                    "checkpoints (state.work_dir is not set); drop the option(s) or set state.work_dir")  # fmt: skip
            return None
        return Path(work) / "checkpoints" / name

    def _config(self, state: CompileState, name: str) -> TrainConfig:
        o = self.options
        ckpt_dir = self._checkpoint_dir(state, name)
        return TrainConfig(
            epochs=o.run_epochs, max_steps=o.max_steps, time_budget_s=o.minutes * 60 if o.minutes else None, lr=o.run_lr, weight_decay=o.weight_decay,
            optimizer=o.optimizer, warmup_steps=o.warmup_steps, grad_clip=o.grad_clip,
            precision=o.precision, seed=state.seed, checkpoint_dir=ckpt_dir,
            checkpoint_every=o.checkpoint_every or 0, resume=ckpt_dir is not None and o.resume is not False,
            log_path=ckpt_dir / "metrics.jsonl" if ckpt_dir is not None else None,
            eval_limit=o.eval_limit, progress=o.progress, run_key=self._run_key(name),
            divergence_factor=o.divergence_factor, parallel=o.parallel, dropout=o.dropout,
        )  # fmt: skip

    def _run_key(self, name: str) -> str:
        """What this pass computes, for the resume fingerprint (not how it reports or checkpoints)."""
        skip = {"checkpoint_every", "resume", "eval_limit", "eval_pgd_steps", "progress"}
        opts = {k: v for k, v in dataclasses.asdict(self.options).items() if k not in skip}
        return f"{name}|{sorted(opts.items())}"

    def _loss(self, state: CompileState, student: Any, data: Any, config: TrainConfig,
              built: dict[str, Any], cache: TeacherCache | None) -> DistillLoss:  # fmt: skip
        method = self.options.method
        if method == "adaspec":
            opts = built["adaspec"]
            ref = copy.deepcopy(student)
            ref_cfg = dataclasses.replace(
                config,
                max_steps=opts.ref_steps,
                epochs=1,
                checkpoint_dir=None,
                resume=False,
                log_path=None,
            )
            DistillTrainer(ref, state.teacher, "kd", ref_cfg, temperature=opts.temperature,
                           teacher_outputs=cache.outputs if cache is not None else None).fit(data)
            return methods.make_method_loss(method, built, ref_model=ref.eval())
        return methods.make_method_loss(method, built)

    def run(self, state: CompileState) -> PassResult:
        o = self.options
        source = state.train_data or state.calib_data
        if source is None:
            raise InputError(NO_DATA)
        asked_eval = [k for k, v in (("eval_limit", o.eval_limit), ("eval_pgd_steps", o.eval_pgd_steps)) if v]
        require(state.eval_data is not None or not asked_eval, "distill",
                f"{', '.join(asked_eval)} given, but there is no evaluation data (--eval-data or eval_data()); "
                "give it or drop the option(s)")  # fmt: skip
        built = o.method_options()
        data: Any = Rebatched(source, o.batch_size) if o.batch_size else source
        # a cached teacher saw the stored pixels only: views need the live teacher
        augment = wants_augment(data, o.augment, "distill") and (o.augment is True or o.teacher_outputs == "live")
        # a few photos misdescribe the statistics a pretrained teacher's BatchNorm learnt: they stay
        batchnorm = o.batchnorm or ("frozen" if few_images(data) else "train")
        if augment:
            data = AugmentedImages(data, state.seed)
        student = state.working()
        reference = self._reference(state)
        guard = self._guard(reference, student.module)
        config = dataclasses.replace(self._config(state, student.name), batchnorm=batchnorm)
        probed: ProbeResult | None = None
        with self._teacher_cache(state, student.name, data, config, built) as (cache, cached):
            loss = self._loss(state, student.module, data, config, built, cache)

            def make_trainer(loss: DistillLoss, config: TrainConfig) -> DistillTrainer:
                trainer = DistillTrainer(StudentSpec(student.module, name=student.name), state.teacher, loss, config,
                                         teacher_outputs=cache.outputs if cache is not None else None)  # fmt: skip
                trainer.loss_name = o.method
                return trainer

            probe: dict[str, Any] | None = None
            if o.lr_probe is not None:
                probed, probe, config = self._probe(student, data, config, loss, reference, guard, make_trainer)
                loss = probed.loss if probed is not None else loss
            trainer = make_trainer(loss, config)
            trainer.start_optimizer_state = probed.optimizer_state if probed is not None else None
            result = trainer.fit(data, state.eval_data)
        steps = result.steps + (probed.steps if probed is not None else 0)
        seconds = result.seconds + (probed.seconds if probed is not None else 0.0)
        metrics: dict[str, Any] = {
            "method": o.method,
            "options": methods.resolved(built),
            "lr": config.lr,
            "steps": steps,
            "loss": result.loss,
            "seconds": seconds,
            "samples_per_s": result.samples_per_s,
            "resumed_from": result.resumed_from,
            "checkpoints": str(config.checkpoint_dir) if config.checkpoint_dir is not None else None,
            "teacher_outputs": cached or "live",
            "augment": augment,
            "dropout": o.dropout,
            "batchnorm": batchnorm,
            "minutes_used": seconds / 60,
            "budget_minutes": o.minutes,
            "stopped_by_budget": result.stopped_by_budget,
            "planned_steps": None if o.epochs is None and o.minutes is not None else result.planned_steps + steps - result.steps,
        }
        if probe is not None:
            metrics["lr_probe"] = probe
        if cache is not None and cached is not None:
            cached.update(computed_in_training=cache.filled, read_back=cache.hits)
        if result.stopped_by_budget:
            note(f"distill: {student.name}: the {o.minutes:g}-minute budget stopped training after {steps} steps"
                 f" ({seconds / 60:.1f} min)")  # fmt: skip
        if trainer.discarded:
            metrics["checkpoint_discarded"] = trainer.discarded
        if result.metrics:
            metrics["eval"] = next(iter(result.metrics.values()))
        if guard is not None:
            metrics["heldout"] = guard.settle(student.module, student.name)
            if not metrics["heldout"]["kept"]:
                student.history.append("distill: training rejected on held-out data (it raised the loss)")
        if o.method in ROBUST:
            metrics["robust"] = self._robust(state, student.module, built[o.method])
        student.module.eval()
        student.metrics["distill"] = metrics
        state.facts.add("distilled")
        return PassResult(state, True)

    def _reference(self, state: CompileState) -> Any:
        """The teacher's outputs on the held-out batches (a ``HeldoutReference``), where ``check`` or
        ``lr_probe`` compares on them and there are any; else None."""
        check = self.options.check
        if check and state.heldout_data is None:
            raise InputError("distill{check=true}: there are no held-out batches to check the training on; "
                             "give --calib, or drop check")  # fmt: skip
        checks = check is True or (check is None and self.options.method not in ROBUST)
        if state.heldout_data is None or not (checks or self.options.lr_probe is not None):
            return None
        from potstill.passes.prune.heldout import HeldoutReference, as_batches

        return HeldoutReference.of(state.teacher, as_batches(state.heldout_data()))

    def _guard(self, reference: Any, module: Any) -> HeldoutGuard | None:
        """The held-out check of ``check`` (see the module docstring), armed before training."""
        check = self.options.check
        if reference is None or check is False or (check is None and self.options.method in ROBUST):
            return None
        return HeldoutGuard.arm(reference, module)

    def _probe(self, student: Any, data: Any, config: TrainConfig, loss: DistillLoss, reference: Any,
               guard: HeldoutGuard | None, make_trainer: Any) -> tuple[ProbeResult | None, dict[str, Any], TrainConfig]:  # fmt: skip
        """``lr_probe`` (see ``lr_probe``): the probe's result, its record, and the settings the run goes
        on with (the winner's lr, what is left of the budget and of the planned steps). Without held-out
        batches or with too few planned steps there is no probe: the run trains at the first candidate."""
        from .config import total_steps
        from .distributed import init_distributed

        o = self.options
        candidates: tuple[float, ...] = o.lr_probe or ()
        planned = total_steps(data, config, init_distributed(None))
        n = probe_steps(len(candidates), planned, o.probe_steps or PROBE_STEPS)
        why = ("there are no held-out batches to compare the candidates on" if reference is None
               else f"{planned} planned steps are too few to probe {len(candidates)} candidates" if n < 1 else None)  # fmt: skip
        if why is not None:
            note(f"distill: {student.name}: no lr probe ({why}); training at lr {candidates[0]:g}")
            return None, {"chosen": candidates[0], "skipped": why}, dataclasses.replace(config, lr=candidates[0])
        probed = probe_lr(student.module, loss, data, config, candidates, reference.loss, make_trainer, steps=n,
                          loss_before=guard.before if guard is not None else None)  # fmt: skip
        losses = ", ".join(f"{lr:g} -> {v:.4g}" for lr, v in probed.losses.items())
        note(f"distill: {student.name}: lr probe, held-out loss after {probed.steps} steps from the same start: {losses} "
             f"(before {probed.loss_before:.4g}; {probed.seconds:.0f} s); training on from lr {probed.lr:g}'s state")  # fmt: skip
        left = None if config.time_budget_s is None else max(config.time_budget_s - probed.seconds, 1.0)
        rest = dataclasses.replace(config, lr=probed.lr, time_budget_s=left, max_steps=max(planned - probed.steps, 1))
        return probed, probed.record(), rest

    @contextlib.contextmanager
    def _teacher_cache(self, state: CompileState, name: str, data: Any, config: TrainConfig,
                       built: dict[str, Any]) -> Iterator[tuple[TeacherCache | None, dict[str, Any] | None]]:  # fmt: skip
        """With ``teacher_outputs=cached``: the teacher's outputs over every training batch, on disk,
        and what was stored (for the metrics); ``(None, None)`` for the live teacher."""
        o = self.options
        if o.teacher_outputs == "live":
            yield None, None
            return
        want = teacher_want(built)
        # the folder is named by what its files depend on besides the batch: teacher weights, top-k, captures
        key = ckpt.fingerprint(["teacher-cache/1", o.teacher_top_k, dataclasses.asdict(want), state.teacher])[:16]
        with contextlib.ExitStack() as stack:
            work = getattr(state, "work_dir", None)
            if work is None:
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="potstill-teacher-cache-")))
            else:  # one cache per compile: every student reads the batches another one computed
                root = Path(work) / "teacher-cache"
                remove_teacher_caches(root, keep=key)
            cache = TeacherCache(root / key, top_k=o.teacher_top_k)
            what = f"top-{o.teacher_top_k} logits" if o.teacher_top_k else "whole outputs"
            if want.hidden:
                what += " and hidden states"
            where = str(cache.directory) if work is not None else "a temporary folder, removed after training"
            entropy = (" (cema's teacher entropy is that of the renormalised top-k distribution)"
                       if o.teacher_top_k and "cema" in built else "")  # fmt: skip
            if o.minutes is not None:  # the steps are not known in advance: fill as training meets each batch
                cache.fill_from(state.teacher, want)
                n = len(cache)
                note(f"distill: the teacher's outputs ({what}) are cached in {where} as training meets each batch "
                     f"({n} batches stored already); later epochs and students read them back{entropy}")  # fmt: skip
            else:  # exactly the batches the steps will see: every epoch's order, the step limit, the sharding
                n = cache.build(state.teacher, step_batches(data, config), want)
                size = sum(f.stat().st_size for f in cache.directory.glob("*.safetensors"))
                note(f"distill: the teacher's outputs were precomputed for {n} training batches ({what}, "
                     f"{len(cache)} files, {size / 2**20:.1f} MiB on disk in {where}); training reads them instead of "
                     f"running the teacher{entropy}")  # fmt: skip
            size = sum(f.stat().st_size for f in cache.directory.glob("*.safetensors"))
            yield cache, {"mode": "cached", "batches": n, "files": len(cache), "top_k": o.teacher_top_k,
                          "hidden": want.hidden, "bytes": size,
                          "dir": str(cache.directory) if work is not None else None}  # fmt: skip

    def _robust(self, state: CompileState, module: Any, opts: methods.PGDOptions) -> dict[str, Any] | str:
        if state.eval_data is None:
            return "not measured: no evaluation data (--eval-data or eval_data())"
        from .robust import PGDConfig, robust_accuracy

        cfg = PGDConfig(eps=opts.eps, step_size=opts.eps / 4, steps=opts.eval_pgd_steps,
                        clamp=opts.bounds if opts.clamp else None)  # fmt: skip
        result: dict[str, Any] = robust_accuracy(module, state.eval_data, cfg, self.options.eval_limit)
        return result


#: methods that trade clean fidelity for robustness: not held-out-checked unless check=true
ROBUST = frozenset({"ard", "rslad"})


@dataclass
class HeldoutGuard:
    """The student's held-out loss and weights before training; ``settle`` keeps the better."""

    reference: Any  # potstill.passes.prune.heldout.HeldoutReference
    before: float
    weights: dict[str, Any]

    @classmethod
    def arm(cls, reference: Any, module: Any) -> HeldoutGuard:
        weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return cls(reference, reference.loss(module), weights)

    def settle(self, module: Any, name: str) -> dict[str, Any]:
        """Put the weights before training back when training did not lower the held-out loss."""
        after = self.reference.loss(module)
        kept = after < self.before
        if not kept:
            module.load_state_dict(self.weights)
            note(f"[bold yellow]warning:[/] distill: {name}: training raised the held-out loss ({self.before:.4g} -> "
                 f"{after:.4g}), so the student before training is kept; more or more varied training data "
                 "(--data) may help (distill{check=false} keeps the training anyway)")  # fmt: skip
        return {"loss_before": self.before, "loss_after": after, "kept": kept}


def teacher_want(built: dict[str, Any]) -> Want:
    """What the method's loss reads from the teacher (adaspec and cema: logits only)."""
    want = Want()
    for part, opts in built.items():
        if part in methods.COMPOSABLE:  # the regimes read the teacher's logits
            want = want | make_loss(part, **methods.loss_kwargs(part, opts)).teacher_want()
    return want


def note(message: str) -> None:
    """Say on the console (stderr) what the pass did differently."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(message)


def _is_method(value: Any) -> bool:
    try:
        methods.parse_method(str(value))
    except InputError:
        return False
    return True
