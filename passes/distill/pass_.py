"""The ``distill`` pass: the working student learns from the teacher on the training data.

``prune.width{ratio=0.5},distill{loss=kd,epochs=3}``. The method picks the objective:

* ``kd`` — the ``loss`` option (``kd``, ``hidden``, ``attention``, ``cosine`` or a sum such as
  ``kd+hidden``); ``kd`` is ``α T² KL(p_t^T || q_s^T) + (1 − α) CE`` (Hinton et al. 2015);
* ``ard`` / ``rslad`` — adversarially robust distillation (Goldblum et al. 2020; Zi et al. 2021)
  with PGD (ε, ``pgd_steps``); robust accuracy under PGD-20 is reported on labelled eval data;
* ``adaspec`` — AdaSPEC token selection (arXiv 2510.19779); the reference model is a copy of the
  student distilled with plain KD for ``ref_steps``;
* ``cema`` — CEMA entropy-based sample selection and weighting (ICLR 2024).

Data: ``state.train_data``, else ``state.calib_data``. Metrics go to ``student.metrics["distill"]``;
with ``state.out_dir`` set, checkpoints and a JSON-lines log go to
``out_dir/checkpoints/<student>/`` and ``resume=true`` continues an interrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from potstill.errors import InputError
from potstill.pipeline import Pass, PassResult, register_pass
from potstill.state import CompileState

from .batches import Rebatched
from .losses import DistillLoss, make_loss
from .trainer import DistillTrainer, TrainConfig

METHODS = ("kd", "ard", "rslad", "adaspec", "cema")


@dataclass(frozen=True)
class DistillOptions:
    loss: str = "kd"
    method: str = "kd"
    epochs: int = 1
    max_steps: int = 0  # 0: no limit beyond epochs
    lr: float = 1e-3
    batch_size: int = 0  # 0: the batches as the data yields them
    temperature: float = 1.0
    alpha: float = 1.0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    precision: str = "fp32"
    eps: float = 8 / 255
    clamp: bool = True  # keep attacked inputs in [input_min, input_max]
    input_min: float = 0.0
    input_max: float = 1.0
    pgd_steps: int = 10
    eval_pgd_steps: int = 20
    k: float = 0.4
    entropy_fraction: float = 0.4
    ref_steps: int = 0  # adaspec reference: 0 = one epoch
    checkpoint_every: int = 0
    resume: bool = False
    eval_limit: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


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

    def _config(self, state: CompileState, name: str) -> TrainConfig:
        o = self.options
        ckpt_dir = state.out_dir / "checkpoints" / name if state.out_dir is not None else None
        return TrainConfig(
            epochs=o.epochs, max_steps=o.max_steps or None, lr=o.lr, weight_decay=o.weight_decay,
            optimizer=o.optimizer, warmup_steps=o.warmup_steps, grad_clip=o.grad_clip or None,
            precision=o.precision, seed=state.seed, checkpoint_dir=ckpt_dir,
            checkpoint_every=o.checkpoint_every, resume=o.resume,
            log_path=ckpt_dir / "metrics.jsonl" if ckpt_dir is not None else None,
            eval_limit=o.eval_limit or None, progress=o.progress,
        )

    def _clamp(self) -> tuple[float, float] | None:
        return (self.options.input_min, self.options.input_max) if self.options.clamp else None

    def _loss(self, state: CompileState, student: Any, data: Any, config: TrainConfig) -> DistillLoss:
        o = self.options
        pgd = {"eps": o.eps, "step_size": o.eps / 4, "steps": o.pgd_steps, "clamp": self._clamp()}
        if o.method == "ard":
            return make_loss("ard", alpha=o.alpha, temperature=o.temperature, **pgd)
        if o.method == "rslad":
            return make_loss("rslad", **pgd)
        if o.method == "cema":
            return make_loss("cema", fraction=o.entropy_fraction, temperature=o.temperature)
        if o.method == "adaspec":
            ref = copy.deepcopy(student)
            ref_cfg = dataclasses.replace(
                config, max_steps=o.ref_steps or None, epochs=1, checkpoint_dir=None, resume=False,
                log_path=None,
            )
            DistillTrainer(ref, state.teacher, "kd", ref_cfg, temperature=o.temperature).fit(data)
            return make_loss("adaspec", ref_model=ref.eval(), k=o.k, temperature=o.temperature)
        return make_loss(o.loss, strict=False, temperature=o.temperature, alpha=o.alpha)

    def run(self, state: CompileState) -> PassResult:
        o = self.options
        source = state.train_data or state.calib_data
        if source is None:
            raise InputError(NO_DATA)
        data: Any = Rebatched(source, o.batch_size) if o.batch_size else source
        student = state.working()
        config = self._config(state, student.name)
        loss = self._loss(state, student.module, data, config)
        trainer = DistillTrainer(student.module, state.teacher, loss, config)
        result = trainer.fit(data, state.eval_data)
        metrics: dict[str, Any] = {
            "method": o.method,
            "loss_name": o.loss if o.method == "kd" else o.method,
            "steps": result.steps,
            "loss": result.loss,
            "seconds": result.seconds,
            "samples_per_s": result.samples_per_s,
            "resumed_from": result.resumed_from,
        }
        if result.metrics:
            metrics["eval"] = next(iter(result.metrics.values()))
        if o.method in {"ard", "rslad"} and state.eval_data is not None:
            from .robust import PGDConfig, robust_accuracy

            cfg = PGDConfig(eps=o.eps, step_size=o.eps / 4, steps=o.eval_pgd_steps, clamp=self._clamp())
            metrics["robust"] = robust_accuracy(student.module, state.eval_data, cfg, o.eval_limit or None)
        student.module.eval()
        student.metrics["distill"] = metrics
        state.facts.add("distilled")
        return PassResult(state, True)
