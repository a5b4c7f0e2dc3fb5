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

Resume: a checkpoint records a fingerprint of what the run started from (``run_key``, the training
settings, the students' and the teacher's initial weights, the first batch). ``resume=True``
continues only from a checkpoint with the same fingerprint; others are deleted and the run starts
fresh. Numeric health (finite loss, gradients and weights; divergence) is checked every step, see
``health``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError, NumericError
from potstill.inputs.data import Batch, as_batch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as ddp
from . import fsdp, health
from .batches import count_batches, epoch_batches
from .capture import ForwardFn, ModelOutputs, Want, run_model, unwrap
from .evaluate import Evaluator, MetricsLog, evaluate
from .losses import DistillLoss, LossInputs, SumLoss, make_loss
from .progress import StepProgress
from .schedule import make_optimizer, make_scheduler

DataSource = Callable[..., Iterable[Any]] | Iterable[Any]


@dataclass
class StudentSpec:
    """A student: a module, or a configuration of one run by ``forward(module, batch, config)``."""

    module: nn.Module
    config: Any = None
    weight: float = 1.0
    forward: ForwardFn | None = None
    name: str = ""


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None
    steps_per_epoch: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on CUDA only)
    seed: int = 0
    device: str | None = None
    inplace: bool = False
    balance: bool = False
    shard: str = "split"  # split | batches
    #: under torchrun: "ddp" (each rank a whole student), "fsdp" (FSDP2: each rank a shard of its
    #: weights, gradients and optimizer state, for students too big for one device), "auto" (DDP
    #: under torchrun, one process otherwise). ddp and fsdp need torchrun with WORLD_SIZE > 1.
    parallel: str = "auto"
    find_unused_parameters: bool = False
    checkpoint_dir: Path | None = None
    #: every this many steps; 0: at the end of each epoch (and always at the end)
    checkpoint_every: int = 0
    keep_checkpoints: int = 1
    resume: bool = False
    log_path: Path | None = None
    log_every: int = 10
    eval_every: int = 0
    eval_limit: int | None = None
    progress: bool = True
    #: identity of the run beyond these settings (the distill pass's spec): part of the fingerprint
    run_key: str = ""
    #: fail when the loss ends above this multiple of its start (``health``); None: do not check
    divergence_factor: float | None = 10.0


PARALLEL = ("auto", "ddp", "fsdp")


def not_launched(parallel: str) -> str:
    return (
        f"parallel={parallel} needs several processes under torchrun (WORLD_SIZE > 1), but this is one "
        f"process: launch with 'torchrun --nproc_per_node N ...', or use parallel=auto to train in this process"
    )


#: settings that do not change what a run computes (left out of the resume fingerprint)
_NOT_FINGERPRINTED = {"checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "log_path", "log_every",
                      "eval_every", "eval_limit", "progress"}  # fmt: skip


@dataclass
class TrainResult:
    steps: int
    epochs: int
    loss: float
    seconds: float
    samples: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    resumed_from: int | None = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def _epoch_iter(data: DataSource, c: TrainConfig, dist: ddp.DistContext, epoch: int) -> Iterator[Any]:
    items = epoch_batches(data, c.seed, epoch)
    return ddp.shard_batches(items, dist) if c.shard == "batches" and dist.enabled else items


def _total_steps(data: DataSource, c: TrainConfig, dist: ddp.DistContext) -> int:
    """Steps in the run on this rank."""
    per_epoch = c.steps_per_epoch or count_batches(data, c.seed)
    if c.shard == "batches" and dist.enabled:
        per_epoch = -(-per_epoch // dist.world_size)
    return min(c.max_steps or per_epoch * c.epochs, per_epoch * c.epochs)


def step_batches(data: DataSource, config: TrainConfig, dist: ddp.DistContext | None = None) -> Iterator[Batch]:
    """Every batch a step of ``DistillTrainer.fit(data)`` with ``config`` trains on, on this rank, in
    order: every epoch (each in its ``(seed, epoch)`` order), up to the step limit, sharded as the
    steps shard it. What a teacher cache (``teacher_cache``) must hold."""
    dist = dist or ddp.init_distributed(torch.device(config.device) if config.device else None)
    total, step = _total_steps(data, config, dist), 0
    for epoch in range(config.epochs):
        for raw in _epoch_iter(data, config, dist, epoch):
            if step >= total:
                return
            batch = as_batch(raw)
            yield ddp.shard_batch(batch, dist)[0] if config.shard == "split" else batch
            step += 1


class DistillTrainer:
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
        self.dist = ddp.init_distributed(torch.device(self.config.device) if self.config.device else None)
        if self.config.parallel != "auto" and not self.dist.enabled:
            raise InputError(not_launched(self.config.parallel))
        #: FSDP2: the students train as sharded replicas (``self.wrapped``), copied back at the end
        self.sharded = self.config.parallel == "fsdp"
        self.device = self._pick_device()
        self.modules = list({id(s.module): s.module for s in self.students}.values())
        self.wrapped: dict[int, nn.Module] = {}
        self.log = MetricsLog(self.config.log_path if self.dist.is_main else None)
        self._teacher_saved: tuple[list[tuple[nn.Parameter, bool]], list[tuple[nn.Module, bool]], Any] | None = None
        self.discarded: str | None = None
        self.fingerprint: str | None = None
        self.monitor: health.DivergenceMonitor | None = None
        self.last_loss = float("nan")

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

    def _freeze_teacher(self) -> None:
        """Freeze the teacher for this run only; ``_restore_teacher`` puts every flag back."""
        t = self.teacher
        if t is None:
            return
        first = next(iter(t.parameters()), None)
        self._teacher_saved = (
            [(p, p.requires_grad) for p in t.parameters()],
            [(m, m.training) for m in t.modules()],
            first.device if first is not None else None,
        )
        if self.teacher_outputs is None:  # with cached outputs the teacher stays where it is, off the device
            t.to(self.device)
        t.eval().requires_grad_(False)

    def _restore_teacher(self) -> None:
        if self.teacher is None or self._teacher_saved is None:
            return
        params, modules, device = self._teacher_saved
        for p, flag in params:
            p.requires_grad_(flag)
        for m, training in modules:
            m.training = training  # not m.train(): that would also reset the children
        if device is not None and device != self.device:
            self.teacher.to(device)
        self._teacher_saved = None

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
        self._freeze_teacher()
        self.loss.to(self.device)
        for m in self.loss.frozen_models():
            m.to(self.device).eval().requires_grad_(False)
        if self.loss.needs_probe():
            # a dry run creates the loss's lazily-built projections before the optimizer exists
            with torch.no_grad():
                self._losses(probe, self.students)
        ddp.broadcast_parameters(self.loss.parameters(), self.dist)
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
        # the trained modules' parameters: under FSDP the replicas' shards (DTensors)
        params = {id(p): p for m in self.modules for p in self._trained(m).parameters() if p.requires_grad}
        params.update({id(p): p for p in self.loss.parameters() if p.requires_grad})
        c = self.config
        self.optimizer = make_optimizer(params.values(), c.optimizer, c.lr, c.weight_decay, c.momentum)
        self.scaler = torch.amp.GradScaler("cuda", enabled=c.precision == "fp16" and self.device.type == "cuda")

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

    def _check_weights(self, step: int) -> None:
        named = [(spec.name, self._trained(spec.module)) for spec in self.students]
        gather = (lambda bad: ddp.gather_objects(bad, self.dist)) if self.sharded else None
        health.check_weights(named, step, self.config.lr, gather)

    def _unshard(self) -> None:
        """FSDP: copy each replica's full trained weights into its plain module (every rank), drop it."""
        if not self.sharded:
            return
        for m in self.modules:
            replica = self.wrapped.pop(id(m), None)
            if replica is not None:
                fsdp.gather_into(replica, m)

    # -- checkpoints -------------------------------------------------------------------------------

    def _state(self, step: int, epoch: int, position: int) -> dict[str, Any]:
        return {
            "version": 1,
            "step": step,
            "epoch": epoch,
            "position": position,
            "world_size": self.dist.world_size,
            "students": [fsdp.full_state_dict(self._trained(m)) if self.sharded else m.state_dict()
                         for m in self.modules],
            "loss": self.loss.state_dict(),
            "optimizer": fsdp.full_optimizer_state(self.optimizer) if self.sharded else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "fingerprint": self.fingerprint,
            "first_loss": self.monitor.first if self.monitor is not None else None,
        }

    def save(self, step: int, epoch: int, position: int) -> Path | None:
        self._check_weights(step)  # never checkpoint a NaN
        rngs = ddp.gather_objects(ckpt.rng_state(), self.dist)
        path = None
        # under FSDP gathering the full state is collective: every rank takes part, rank 0 writes
        state = self._state(step, epoch, position) if self.sharded else None
        if self.dist.is_main and self.config.checkpoint_dir is not None:
            payload = (state or self._state(step, epoch, position)) | {"rng": rngs}
            path = ckpt.save_checkpoint(self.config.checkpoint_dir, step, payload, self.config.keep_checkpoints)
        ddp.barrier(self.dist)
        return path

    def _restore(self, state: dict[str, Any]) -> None:
        for m, sd in zip(self.modules, state["students"]):
            if self.sharded and id(m) in self.wrapped:
                fsdp.load_full_state(self.wrapped[id(m)], sd)
            else:
                m.load_state_dict(sd)
        self.loss.load_state_dict(state["loss"])
        optimizer = state["optimizer"]
        self.optimizer.load_state_dict(fsdp.shard_optimizer_state(optimizer, self.optimizer) if self.sharded else optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    # -- the loop ----------------------------------------------------------------------------------

    def _epoch_iter(self, data: DataSource, epoch: int) -> Iterator[Any]:
        return _epoch_iter(data, self.config, self.dist, epoch)

    def fit(self, data: DataSource, eval_data: DataSource | None = None) -> TrainResult:
        """Train for ``epochs`` (or ``max_steps``) over ``data``; evaluate on ``eval_data``.

        The teacher's flags are restored on the way out, whether training succeeded or raised.
        """
        try:
            return self._fit(data, eval_data)
        finally:
            self._restore_teacher()

    def _fingerprint(self, data: DataSource, probe: Any) -> str:
        c = self.config
        if c.shard == "batches" and self.dist.enabled:  # each rank's probe differs: use the unsharded first
            probe = next(iter(epoch_batches(data, c.seed, 0)))
        first = as_batch(probe)
        settings = {k: v for k, v in dataclasses.asdict(c).items() if k not in _NOT_FINGERPRINTED}
        tensors = [x for x in (*first.args, *first.kwargs.values(), first.target) if isinstance(x, torch.Tensor)]
        return ckpt.fingerprint(
            [ckpt.FORMAT, settings, self.dist.world_size, self.loss_name, *self.modules, self.loss,
             *([self.teacher] if self.teacher is not None else []), *tensors]
        )  # fmt: skip

    def _resume_state(self, data: DataSource, probe: Any) -> dict[str, Any] | None:
        """The checkpoint to continue from, if any matches this run; clears the ones that do not."""
        c = self.config
        if c.checkpoint_dir is None:
            return None
        self.fingerprint = self._fingerprint(data, probe)
        last = ckpt.latest_checkpoint(c.checkpoint_dir) if c.resume else None  # refuses pickles
        state = ckpt.load_checkpoint(last) if last is not None else None
        if state is not None and state.get("fingerprint") != self.fingerprint:
            self.discarded = f"{last}: written by a run with other settings, weights or data; started afresh"
            state = None
        if state is None:
            ddp.barrier(self.dist)  # every rank has read before rank 0 deletes
            if self.dist.is_main:
                ckpt.remove_checkpoints(c.checkpoint_dir)
                self.log.truncate_after(0)
            ddp.barrier(self.dist)
        return state

    def _fit(self, data: DataSource, eval_data: DataSource | None) -> TrainResult:
        c = self.config
        total = _total_steps(data, c, self.dist)
        if total <= 0:
            raise InputError("the training data yielded no batches")
        probe = next(iter(self._epoch_iter(data, 0)))
        probe_batch = ddp.shard_batch(as_batch(probe), self.dist)[0] if c.shard == "split" else as_batch(probe)
        ckpt.seed_everything(c.seed)
        self._setup(probe_batch.to(self.device))
        self.scheduler = make_scheduler(self.optimizer, c.schedule, total, c.warmup_steps, c.min_lr_ratio)
        step, epoch0, position, resumed = 0, 0, 0, None
        rng: dict[str, Any] | None = None
        state = self._resume_state(data, probe)
        self.monitor = health.DivergenceMonitor(total, c.divergence_factor)
        if state is not None:
            self._restore(state)
            step, epoch0, position, resumed = state["step"], state["epoch"], state["position"], state["step"]
            self.monitor.start_from(state.get("first_loss"))
            rngs = state["rng"]
            rng = rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0]
            self.log.truncate_after(step)
        t0, samples, loss_value = time.perf_counter(), 0, float("nan")
        epoch, pos = epoch0, position
        bar = StepProgress(total, enabled=c.progress and self.dist.is_main, start=step)
        with bar:
            for epoch in range(epoch0, c.epochs):
                if step >= total:
                    break
                it = self._epoch_iter(data, epoch)
                if epoch == epoch0 and position:
                    for _ in range(position):
                        if next(it, None) is None:
                            break
                if rng is not None:
                    ckpt.set_rng_state(rng)
                    rng = None
                pos = position if epoch == epoch0 else 0
                for raw in it:
                    _, n = self.train_step(raw, step)
                    step, pos, samples = step + 1, pos + 1, samples + n * self.dist.world_size
                    loss_value = self.last_loss
                    self.monitor.update(step, loss_value, c.lr)
                    rate = samples / max(time.perf_counter() - t0, 1e-9)
                    log_now = step % max(c.log_every, 1) == 0 or step == total
                    bar.update(step, loss_value if log_now else None, rate)
                    if log_now:
                        self._check_weights(step)
                        lr = self.optimizer.param_groups[0]["lr"]
                        self.log.append({"step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                                         "samples_per_s": rate})
                    if c.eval_every and eval_data is not None and step % c.eval_every == 0:
                        self.log.append({"step": step, "eval": self.evaluate(eval_data)})
                    if c.checkpoint_every and step % c.checkpoint_every == 0:
                        self.save(step, epoch, pos)
                    if step >= total:
                        break
                if c.checkpoint_dir is not None and not c.checkpoint_every and step < total:
                    self.save(step, epoch, pos)  # once per epoch: a killed run loses at most one
                position = 0
        self._check_weights(step)
        self.monitor.finish(c.lr)
        if c.checkpoint_dir is not None and (not c.checkpoint_every or step % c.checkpoint_every):
            self.save(step, epoch, pos)
        self._unshard()
        metrics = self.evaluate(eval_data) if eval_data is not None else {}
        seconds = time.perf_counter() - t0
        self.log.append({"step": step, "final": True, "loss": loss_value, "seconds": seconds, "eval": metrics})
        for m in self.modules:
            m.eval()
        return TrainResult(step, epoch + 1, loss_value, seconds, samples, metrics, resumed)

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
