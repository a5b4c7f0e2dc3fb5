"""One distillation trainer for every method.

Per step, for students ``S_1..S_K`` with weights ``w_k`` and teacher ``T``:

    L = Σ_k w_k · ℓ(S_k(x), T(x), x, masks)

``T`` is frozen during ``fit`` (its ``requires_grad`` and train/eval flags and its device are
restored afterwards: a teacher shared by several students leaves each run as it came), or — in-place distillation (Yu et al., Slimmable / BigNAS; OFA) — the first
(largest) student's detached output teaches the others while the first learns from the frozen
teacher if any, else from the labels. With ``balance=True`` each term is rescaled as in AmoebaLLM
(arXiv 2411.10606): ``ℓ_k · ℓ_1.detach() / ℓ_k.detach()``. A student is a module, or a
``StudentSpec(module, config, forward)`` — a configuration of a shared module (an elastic
supernet's subnet); ``sample_students(step)`` may pick new configurations every step.

Optimisation: AdamW or SGD, cosine schedule with warm-up, gradient clipping, autocast (bf16 on CPU
only when asked; fp16 with a grad scaler or bf16 on CUDA), seeded. Under ``torchrun`` the
students run in DDP (see ``distributed``), or with ``parallel="fsdp"`` sharded by FSDP2 (see
``fsdp``: a sharded replica trains, its gradients reduce-scattered, and the full trained weights
are copied back into the plain student on every rank at the end, so what follows — export,
lowering — sees an ordinary module); checkpoints and logs come from rank 0 only (see
``checkpoint`` for the resume guarantee; under FSDP they hold the full weights and optimizer state).

A run ends after its epochs, its ``max_steps``, or its wall-clock budget (``time_budget_s``, see
``budget``), whichever comes first. Resume: see ``trainer_checkpoints``. Numeric health (finite
loss, gradients and weights; divergence) is checked every step, see ``health``.

The parts: ``config`` (settings, result, the batches of each step), ``frozen`` (the teacher's flags),
``trainer_checkpoints`` (save, restore, resume), ``budget`` and ``progress``; this module is the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from potstill.errors import InputError, NumericError
from potstill.inputs.data import Batch, as_batch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as ddp
from . import fsdp, health
from .budget import TimeBudget
from .capture import ModelOutputs, Want, run_model, unwrap
from .config import (
    PARALLEL,
    DataSource,
    StudentSpec,
    TrainConfig,
    TrainResult,
    epoch_iter,
    not_launched,
    step_batches,
    total_steps,
)
from .evaluate import Evaluator, MetricsLog, evaluate
from .frozen import FrozenTeacher
from .losses import DistillLoss, LossInputs, SumLoss, make_loss
from .progress import StepProgress
from .schedule import make_optimizer, make_scheduler
from .trainer_checkpoints import CheckpointingMixin

__all__ = ["PARALLEL", "DataSource", "DistillTrainer", "StudentSpec", "TrainConfig", "TrainResult", "not_launched",
           "step_batches"]  # fmt: skip


@dataclass
class _Position:
    """Where the loop is: global step, epoch, batches consumed in that epoch, samples seen."""

    step: int = 0
    epoch: int = 0
    pos: int = 0
    samples: int = 0
    loss: float = float("nan")


class DistillTrainer(CheckpointingMixin):
    """Distil ``teacher`` into ``students`` with ``loss`` (a name, a sum such as ``"kd+hidden"``, or
    a ``DistillLoss``).

    >>> trainer = DistillTrainer(student, teacher, "kd", TrainConfig(epochs=3), temperature=2.0)
    >>> result = trainer.fit(TensorBatches(x, y, batch_size=64))
    """

    def __init__(
        self,
        students: nn.Module | StudentSpec | Sequence[nn.Module | StudentSpec],
        teacher: nn.Module | None,
        loss: str | DistillLoss = "kd",
        config: TrainConfig | None = None,
        *,
        sample_students: Callable[[int], Sequence[StudentSpec]] | None = None,
        evaluators: dict[str, Evaluator] | None = None,
        mask_fn: Callable[[Batch], tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
        teacher_outputs: Callable[[Batch], ModelOutputs] | None = None,
        **loss_options: Any,
    ) -> None:
        self.config = config or TrainConfig()
        items = [students] if isinstance(students, (nn.Module, StudentSpec)) else list(students)
        self.students = [s if isinstance(s, StudentSpec) else StudentSpec(s) for s in items]
        if not self.students:
            raise InputError("distillation needs at least one student")
        for i, s in enumerate(self.students):
            s.name = s.name or f"student{i}"
        self.teacher = teacher
        self.loss = make_loss(loss, **loss_options)
        self.loss_name = loss if isinstance(loss, str) else type(loss).__name__
        #: precomputed teacher outputs by batch (``teacher_cache.TeacherCache.outputs``): no teacher run
        self.teacher_outputs = teacher_outputs
        if teacher is None and teacher_outputs is None and not self.config.inplace and self.loss.needs_teacher():
            raise InputError("no teacher given: pass a teacher, set inplace=True, or use a label loss (kd alpha=0)")
        self.sample_students = sample_students
        self.evaluators = dict(evaluators or {})
        self.mask_fn = mask_fn
        if self.config.parallel not in PARALLEL:
            raise InputError(f"parallel must be one of {', '.join(PARALLEL)}, got {self.config.parallel!r}")
        self.budget = TimeBudget(self.config.time_budget_s)  # checks the budget now, before any work
        self.dist = ddp.init_distributed(torch.device(self.config.device) if self.config.device else None)
        if self.config.parallel != "auto" and not self.dist.enabled:
            raise InputError(not_launched(self.config.parallel))
        #: FSDP2: the students train as sharded replicas (``self.wrapped``), copied back at the end
        self.sharded = self.config.parallel == "fsdp"
        self.device = self._pick_device()
        self.modules = list({id(s.module): s.module for s in self.students}.values())
        self.wrapped: dict[int, nn.Module] = {}
        self.log = MetricsLog(self.config.log_path if self.dist.is_main else None)
        self.frozen = FrozenTeacher(teacher)
        self.discarded: str | None = None
        self.fingerprint: str | None = None
        self.monitor: health.DivergenceMonitor | None = None
        self.last_loss = float("nan")
        #: the optimizer's state to start from (``optimizer.state_dict()`` of an earlier run of these
        #: students and loss, as the lr probe leaves it): AdamW's moments carry on instead of restarting
        self.start_optimizer_state: dict[str, Any] | None = None

    # -- setup -------------------------------------------------------------------------------------

    def _pick_device(self) -> torch.device:
        if self.config.device:
            return torch.device(self.config.device)
        if torch.cuda.is_available():
            return torch.device("cuda", self.dist.local_rank)
        return torch.device("cpu")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        p = self.config.precision
        if p == "fp32":
            return contextlib.nullcontext()
        if p not in {"bf16", "fp16"}:
            raise InputError(f"precision must be fp32, bf16 or fp16, got {p!r}")
        if p == "fp16" and self.device.type != "cuda":
            raise InputError("precision fp16 needs CUDA; on CPU use bf16 or fp32")
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _check_students(self) -> None:
        teacher_params = {id(p) for p in self.teacher.parameters()} if self.teacher is not None else set()
        for spec in self.students:
            params = list(spec.module.parameters())
            if any(id(p) in teacher_params for p in params):
                raise InputError(
                    f"student '{spec.name}' shares parameters with the teacher; distil a copy of it "
                    "(copy.deepcopy(teacher)), or the teacher would learn too"
                )
            if not any(p.requires_grad for p in params):
                raise InputError(
                    f"student '{spec.name}' has no trainable parameters (requires_grad is False everywhere); "
                    "unfreeze it (student.requires_grad_(True)) before distilling"
                )

    def _trainable(self, m: nn.Module) -> bool:
        return any(p.requires_grad for p in m.parameters())

    def _trained(self, m: nn.Module) -> nn.Module:
        """The module that trains in place of ``m``: its DDP wrapper, its FSDP replica, or itself."""
        return self.wrapped.get(id(m), m)

    def _setup(self, probe: Batch) -> None:
        self._check_students()
        if self.sharded and self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # FSDP's default device mesh is the current device
        for m in self.modules:
            if self.sharded and self._trainable(m):
                # the plain module stays where it is, untouched, until ``_unshard`` fills it
                self.wrapped[id(m)] = fsdp.sharded_replica(m, self.device).train()
            else:
                m.to(self.device).train()
            if not self.config.dropout or self.config.batchnorm != "train":
                set_train_modes(self._trained(m), self.config.dropout, self.config.batchnorm == "train")
        # with cached outputs the teacher stays where it is, off the device
        self.frozen.freeze(self.device, move=self.teacher_outputs is None)
        self.loss.to(self.device)
        for m in self.loss.frozen_models():
            m.to(self.device).eval().requires_grad_(False)
        if self.loss.needs_probe():
            # a dry run creates the loss's lazily-built projections before the optimizer exists
            with torch.no_grad():
                self._losses(probe, self.students)
        ddp.broadcast_parameters(self.loss.parameters(), self.dist)
        self._wrap_ddp()
        # the trained modules' parameters: under FSDP the replicas' shards (DTensors)
        params = {id(p): p for m in self.modules for p in self._trained(m).parameters() if p.requires_grad}
        params.update({id(p): p for p in self.loss.parameters() if p.requires_grad})
        c = self.config
        self.optimizer = make_optimizer(params.values(), c.optimizer, c.lr, c.weight_decay, c.momentum)
        if self.start_optimizer_state is not None:  # its state only: lr and the other settings are this run's
            groups = self.optimizer.state_dict()["param_groups"]
            self.optimizer.load_state_dict({"state": self.start_optimizer_state["state"], "param_groups": groups})
        self.scaler = torch.amp.GradScaler("cuda", enabled=c.precision == "fp16" and self.device.type == "cuda")

    def _wrap_ddp(self) -> None:
        for m in self.modules:
            if self.sharded:
                continue
            if self.dist.enabled and self._trainable(m):
                ids = [self.device.index] if self.device.type == "cuda" else None
                self.wrapped[id(m)] = nn.parallel.DistributedDataParallel(
                    m, device_ids=ids, find_unused_parameters=self.config.find_unused_parameters
                )
            else:
                self.wrapped[id(m)] = m

    # -- one step ----------------------------------------------------------------------------------

    def _run(self, spec: StudentSpec, batch: Batch, want: Want) -> ModelOutputs:
        model = self._trained(spec.module)
        return run_model(model, batch, want, spec.forward, spec.config)

    def _rerun(self, spec: StudentSpec, want: Want) -> Callable[[Batch], ModelOutputs]:
        def run(batch: Batch) -> ModelOutputs:
            return self._run(spec, batch, want)

        return run

    def _losses(self, batch: Batch, specs: Sequence[StudentSpec]) -> list[torch.Tensor]:
        s_want, t_want = self.loss.student_want(), self.loss.teacher_want()
        t_out = None
        if self.teacher_outputs is not None and self.loss.needs_teacher():
            t_out = self.teacher_outputs(batch)
        elif self.teacher is not None and self.loss.needs_teacher():
            with torch.no_grad():
                t_out = run_model(self.teacher, batch, t_want).detached()
        token_mask, sample_weight = self.mask_fn(batch) if self.mask_fn else (None, None)
        losses: list[torch.Tensor] = []
        first: ModelOutputs | None = None
        for i, spec in enumerate(specs):
            s_out = self._run(spec, batch, s_want | (t_want if self.config.inplace and i == 0 else Want()))
            teacher_out = t_out
            if self.config.inplace:
                if i == 0:
                    first = s_out.detached()
                else:
                    teacher_out = first
            inputs = LossInputs(
                s_out, teacher_out, batch, token_mask, sample_weight, unwrap(self._trained(spec.module)),
                self._rerun(spec, s_want), self.teacher,
            )
            losses.append(self.loss(inputs))
        return losses

    def train_step(self, raw: Any, step: int) -> tuple[torch.Tensor, int]:
        """One optimisation step on one raw batch; returns (detached loss, samples on this rank).

        The loss stays a device tensor: reading it (``float``) would synchronise CUDA every step.
        """
        batch = as_batch(raw)
        if self.config.shard == "split":
            batch, scale = ddp.shard_batch(batch, self.dist)
        else:
            scale = 1.0
        batch = batch.to(self.device)
        specs = list(self.sample_students(step)) if self.sample_students else self.students
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            losses = self._losses(batch, specs)
        if self.config.balance and len(losses) > 1:
            ref = losses[0].detach()
            losses = [losses[0]] + [li * ref / li.detach().clamp_min(1e-12) for li in losses[1:]]
        total = sum((spec.weight * li.float() for spec, li in zip(specs, losses)), torch.zeros((), device=self.device))
        self.scaler.scale(total * scale).backward()
        ddp.average_gradients(self.loss.parameters(), self.dist)
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # FSDP reduce-scattered the students' gradients; the norm is global either way
        norm = fsdp.clip_grad_norm(params, self.config.grad_clip)
        # one read per step (one device sync on CUDA), before the optimizer steps: a NaN loss or
        # gradient stops the run while the weights are still the last finite ones
        value, bad_loss, bad_grad = ddp.step_health(total.detach(), norm.detach(), self.dist)
        if bad_loss:
            raise NumericError(self._explain_nonfinite(step + 1, specs, losses, batch))
        if bad_grad and not self.scaler.is_enabled():  # fp16 scaling skips such steps by design
            raise NumericError(
                f"distillation: the gradients are NaN/inf at step {step + 1} (loss {value:.3g} was finite); "
                f"lower lr (now {self.config.lr:g}) or use fp32 precision"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.last_loss = value
        return total.detach(), batch.size

    def _explain_nonfinite(
        self, step: int, specs: Sequence[StudentSpec], losses: Sequence[torch.Tensor], batch: Batch
    ) -> str:
        terms: dict[str, dict[str, float]] = {}
        for spec, li in zip(specs, losses):
            parts = getattr(self.loss, "last_parts", None) if isinstance(self.loss, SumLoss) else None
            if parts and len(specs) == 1:
                terms[spec.name] = {k: float(v) for k, v in parts.items()}
            else:
                terms[spec.name] = {self.loss_name: float(li.detach())}
        out = None
        if self.teacher_outputs is not None and self.loss.needs_teacher():
            out = self.teacher_outputs(batch)
        elif self.teacher is not None and self.loss.needs_teacher():
            with torch.no_grad():
                out = run_model(self.teacher, batch, Want())
        teacher_bad = out is not None and not bool(torch.isfinite(out.logits.float()).all())
        return health.explain_nonfinite_loss(
            step, terms, batch, teacher_bad, [(s.name, self._trained(s.module)) for s in specs]
        )

    def _unshard(self) -> None:
        """FSDP: copy each replica's full trained weights into its plain module (every rank), drop it."""
        if not self.sharded:
            return
        for m in self.modules:
            replica = self.wrapped.pop(id(m), None)
            if replica is not None:
                fsdp.gather_into(replica, m)

    # -- the loop ----------------------------------------------------------------------------------

    def _epoch_iter(self, data: DataSource, epoch: int) -> Iterator[Any]:
        return epoch_iter(data, self.config, self.dist, epoch)

    def fit(self, data: DataSource, eval_data: DataSource | None = None) -> TrainResult:
        """Train for ``epochs`` (or ``max_steps``, or until the time budget is spent) over ``data``;
        evaluate on ``eval_data``.

        The teacher's flags are restored on the way out, whether training succeeded or raised.
        """
        try:
            return self._fit(data, eval_data)
        finally:
            self.frozen.restore(self.device)

    def _start(self, data: DataSource, total: int) -> tuple[_Position, dict[str, Any] | None]:
        """Set up the students and the optimizer, and resume from a matching checkpoint if any."""
        c = self.config
        probe = next(iter(self._epoch_iter(data, 0)))
        probe_batch = ddp.shard_batch(as_batch(probe), self.dist)[0] if c.shard == "split" else as_batch(probe)
        ckpt.seed_everything(c.seed)
        self._setup(probe_batch.to(self.device))
        spent = self.budget.fraction if c.time_budget_s is not None else None
        self.scheduler = make_scheduler(self.optimizer, c.schedule, total, c.warmup_steps, c.min_lr_ratio, spent)
        at, rng = _Position(), None
        state = self._resume_state(data, probe)
        self.monitor = health.DivergenceMonitor(total, c.divergence_factor)
        if state is not None:
            self._restore(state, self.wrapped)
            at = _Position(state["step"], state["epoch"], state["position"])
            self.monitor.start_from(state.get("first_loss"))
            rngs = state["rng"]
            rng = rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0]
            self.log.truncate_after(at.step)
        return at, rng

    def _after_step(self, at: _Position, total: int, bar: StepProgress, eval_data: DataSource | None) -> None:
        """Log, check, evaluate and checkpoint after step ``at.step`` as the config asks."""
        c = self.config
        if self.monitor is not None:  # set in _start
            self.monitor.update(at.step, at.loss, c.lr)
        rate = at.samples / max(self.budget.elapsed, 1e-9)
        log_now = at.step % max(c.log_every, 1) == 0 or at.step == total
        bar.update(at.step, at.loss if log_now else None, rate)
        if log_now:
            self._check_weights(at.step)
            lr = self.optimizer.param_groups[0]["lr"]
            self.log.append({"step": at.step, "epoch": at.epoch, "loss": at.loss, "lr": lr, "samples_per_s": rate})
        if c.eval_every and eval_data is not None and at.step % c.eval_every == 0:
            self.log.append({"step": at.step, "eval": self.evaluate(eval_data)})
        if c.checkpoint_every and at.step % c.checkpoint_every == 0:
            self.save(at.step, at.epoch, at.pos)

    def _out_of_time(self) -> bool:
        """The budget is spent (on every rank alike: rank 0's clock decides under torchrun)."""
        if self.config.time_budget_s is None:
            return False
        return bool(ddp.broadcast_object(self.budget.spent, self.dist))

    def _fit(self, data: DataSource, eval_data: DataSource | None) -> TrainResult:
        c = self.config
        total = total_steps(data, c, self.dist)
        if total <= 0:
            raise InputError("the training data yielded no batches")
        self.budget.start()  # setup and the teacher's first outputs count against the budget
        at, rng = self._start(data, total)
        resumed = at.step if rng is not None else None
        epoch0, position, stopped = at.epoch, at.pos, False
        bar = StepProgress(total, enabled=c.progress and self.dist.is_main, start=at.step, description=c.progress_label,
                           budget_s=c.time_budget_s)
        with bar:
            for epoch in range(epoch0, c.epochs):
                if at.step >= total or stopped:
                    break
                it = self._epoch_iter(data, epoch)
                if epoch == epoch0 and position:
                    for _ in range(position):
                        if next(it, None) is None:
                            break
                if rng is not None:
                    ckpt.set_rng_state(rng)
                    rng = None
                at.epoch, at.pos = epoch, position if epoch == epoch0 else 0
                for raw in it:
                    _, n = self.train_step(raw, at.step)
                    at.step, at.pos, at.samples = at.step + 1, at.pos + 1, at.samples + n * self.dist.world_size
                    at.loss = self.last_loss
                    self._after_step(at, total, bar, eval_data)
                    stopped = at.step < total and self._out_of_time()
                    if at.step >= total or stopped:
                        break
                if c.checkpoint_dir is not None and not c.checkpoint_every and at.step < total and not stopped:
                    self.save(at.step, at.epoch, at.pos)  # once per epoch: a killed run loses at most one
                position = 0
        return self._finish(at, total, stopped, resumed, eval_data)

    def _finish(self, at: _Position, total: int, stopped: bool, resumed: int | None,
                eval_data: DataSource | None) -> TrainResult:  # fmt: skip
        c = self.config
        self._check_weights(at.step)
        if self.monitor is not None:  # set in _start
            self.monitor.finish(c.lr)
        if c.checkpoint_dir is not None and (not c.checkpoint_every or at.step % c.checkpoint_every):
            self.save(at.step, at.epoch, at.pos)
        self._unshard()
        metrics = self.evaluate(eval_data) if eval_data is not None else {}
        seconds = self.budget.elapsed
        self.log.append({"step": at.step, "final": True, "loss": at.loss, "seconds": seconds, "eval": metrics,
                         "stopped_by_budget": stopped})  # fmt: skip
        for m in self.modules:
            m.eval()
        return TrainResult(at.step, at.epoch + 1, at.loss, seconds, at.samples, metrics, resumed,
                           stopped_by_budget=stopped, planned_steps=total)  # fmt: skip

    def evaluate(self, data: DataSource) -> dict[str, dict[str, float]]:
        """Built-in accuracy/fidelity plus the registered evaluators, per student."""
        out: dict[str, dict[str, float]] = {}
        for spec in self.students:
            if spec.config is not None:
                continue  # subnet configurations are evaluated by their owner (elastic pass)
            module = unwrap(self._trained(spec.module))  # mid-run under FSDP: the replica (every rank runs it)
            metrics = evaluate(module, self.teacher, data, self.config.eval_limit)
            for name, fn in self.evaluators.items():
                metrics.update({f"{name}.{k}" if k != name else k: v for k, v in fn(module, self.teacher, data).items()})
            out[spec.name] = metrics
        return out


def set_train_modes(model: nn.Module, dropout: bool, batchnorm: bool) -> None:
    """``model`` (in train mode) with its BatchNorm layers training as ``batchnorm`` says and, without
    ``dropout``, every other module in eval mode: ``nn.Dropout``, the attention dropout that Hugging
    Face models gate on ``self.training``, and any other train-only behaviour off."""
    for m in model.modules():
        m.training = batchnorm if isinstance(m, nn.modules.batchnorm._BatchNorm) else dropout
