"""Fidelity: how closely a student still computes what its teacher did, on held-out inputs.

The teacher is the reference; no labels are needed. Per task, over the held-out batches
(``N`` samples, ``t`` the teacher's output, ``s`` the student's):

* ``classification`` (logits ``[..., C]``): top-1 agreement ``mean[argmax t = argmax s]`` (the
  score) and ``KL(p_t || p_s) = mean_n sum_c p_t (log p_t - log p_s)`` with ``p = softmax``.
  When the batches carry labels, the teacher's and the student's accuracy too.
* ``embedding`` (hidden states ``[B, T, H]`` or embeddings ``[B, H]``): sentence embeddings are the
  attention-masked mean over tokens (the pooling of sentence-transformers); the score is the mean
  cosine ``cos(e_t, e_s)``, and ``nn_agreement`` is the fraction of samples whose nearest
  neighbour (cosine, itself excluded) among the held-out samples is the same for both models.
* ``causal_lm`` (logits ``[B, T, V]``): next-token top-1 agreement over non-padding positions (the
  score), ``KL`` per position, and the perplexity ratio ``ppl_s / ppl_t`` with
  ``ppl = exp(mean NLL)`` of the input's next tokens (or of the teacher's argmax without ``input_ids``).
* ``output`` (anything else): relative error ``||s - t||_2 / ||t||_2`` over all outputs; the score
  is ``max(0, 1 - rel_error)``.

A non-finite value in either model's output makes the score NaN and records ``nonfinite`` (the
count): ``Fidelity.ok(floor)`` is then False. NaN is never turned into a number.

``split_heldout`` sets aside a deterministic, evenly spread part of the calibration batches that
importance, reconstruction and BatchNorm statistics never see. Measures follow DESIGN.md §8 and
the agreement metrics of distillation work (e.g. Stanton et al., "Does Knowledge Distillation
Really Work?", NeurIPS 2021, for top-1 agreement and KL as fidelity to the teacher).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from potstill.errors import InputError
from potstill.inputs.data import Batch, as_batch, iter_batches, primary_output
from potstill.pipeline import Pass, PassResult, register_pass
from torch import nn

if TYPE_CHECKING:
    from potstill.state import CompileState, Student

TASKS = ("classification", "embedding", "causal_lm", "output")

#: the measure each task's score is
PRIMARY = {
    "classification": "top1_agreement",
    "embedding": "cosine",
    "causal_lm": "next_token_agreement",
    "output": "1-rel_error",
}

#: what ``--min-fidelity`` / the profile's ``min_fidelity`` defaults to: the student's score must
#: be at least this (top-1 agreement, mean cosine, next-token agreement or 1 - relative error)
DEFAULT_MIN_FIDELITY = 0.8

#: Hugging Face pipeline task -> fidelity task
HF_TASK_MAP = {
    "text-generation": "causal_lm",
    "text-classification": "classification",
    "image-classification": "classification",
    "feature-extraction": "embedding",
}


@dataclass
class Fidelity:
    """Fidelity of a student to its teacher on ``n`` held-out samples (tokens for ``causal_lm``)."""

    task: str
    #: the task's primary measure, higher is better, 1.0 = identical to the teacher; NaN = failed
    score: float
    measures: dict[str, float] = field(default_factory=dict)
    n: int = 0

    @property
    def finite(self) -> bool:
        return math.isfinite(self.score)

    def ok(self, floor: float) -> bool:
        """True when the score is a number at or above ``floor`` (NaN never passes)."""
        return self.finite and self.score >= floor

    def summary(self) -> str:
        """``'top-1 agreement 0.969, KL 0.042 (n=64)'``."""
        if "nonfinite" in self.measures:
            return f"NaN/inf in {int(self.measures['nonfinite'])} outputs (n={self.n})"
        parts = [f"{_LABELS.get(k, k)} {_fmt(v)}" for k, v in self.measures.items()]
        return ", ".join(parts) + f" (n={self.n})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None (JSON has no NaN), with ``failed`` saying so."""
        return {
            "task": self.task,
            "score": self.score if self.finite else None,
            "failed": not self.finite,
            "measures": {k: (v if math.isfinite(v) else None) for k, v in self.measures.items()},
            "n": self.n,
        }


_LABELS = {
    "top1_agreement": "top-1 agreement", "kl": "KL", "teacher_accuracy": "teacher acc",
    "student_accuracy": "student acc", "cosine": "cosine", "nn_agreement": "NN agreement",
    "next_token_agreement": "next-token agreement", "ppl_ratio": "ppl ratio", "rel_error": "rel error",
    "max_abs": "max abs",
}  # fmt: skip


def _fmt(v: float) -> str:
    return "NaN" if math.isnan(v) else f"{v:.3g}" if abs(v) >= 100 else f"{v:.3f}"


# ---------------------------------------------------------------------------------------------
# The held-out split


def split_heldout(batches: Sequence[Any], fraction: float = 0.25) -> tuple[list[Any], list[Any]]:
    """Split calibration batches into ``(calib, heldout)``: disjoint, deterministic, evenly spread.

    ``m = max(1, round(fraction * n))`` of the ``n`` batches are held out, at indices
    ``ceil((j + 1) n / m) - 1`` (the last of each of ``m`` equal stretches), so a corpus read in a
    fixed order is sampled across its length. A single batch is split by rows instead.

    >>> split_heldout(list(range(8)))
    ([0, 1, 2, 4, 5, 6], [3, 7])
    """
    if not 0.0 < fraction < 1.0:
        raise InputError(f"held-out fraction {fraction}: expected a number between 0 and 1")
    items = list(batches)
    if len(items) == 1:
        return _split_rows(as_batch(items[0]), fraction)
    if len(items) < 2:
        raise InputError("the calibration data has no batches: nothing to hold out for measuring fidelity")
    n = len(items)
    m = min(n - 1, max(1, round(fraction * n)))
    held = {math.ceil((j + 1) * n / m) - 1 for j in range(m)}
    return [b for i, b in enumerate(items) if i not in held], [b for i, b in enumerate(items) if i in held]


def _split_rows(batch: Batch, fraction: float) -> tuple[list[Any], list[Any]]:
    size = batch.size
    if size < 2:
        raise InputError(
            "the calibration data is one sample: nothing to hold out for measuring fidelity; give more calibration data"
        )
    m = min(size - 1, max(1, round(fraction * size)))

    def rows(x: Any, sl: slice) -> Any:
        return x[sl] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == size else x

    def part(sl: slice) -> Batch:
        target = rows(batch.target, sl) if batch.target is not None else None
        return Batch(
            tuple(rows(a, sl) for a in batch.args), {k: rows(v, sl) for k, v in batch.kwargs.items()}, target
        )

    return [part(slice(0, size - m))], [part(slice(size - m, size))]


def split_source(
    source: Callable[[], Iterable[Any]] | Iterable[Any], fraction: float = 0.25, limit: int | None = None
) -> tuple[Callable[[], list[Batch]], Callable[[], list[Batch]]]:
    """Read a data function once and return ``(calib_data, heldout_data)`` callables over the split."""
    calib, heldout = split_heldout(list(iter_batches(source, limit)), fraction)
    calib_b, held_b = [as_batch(b) for b in calib], [as_batch(b) for b in heldout]
    return (lambda: list(calib_b)), (lambda: list(held_b))


# ---------------------------------------------------------------------------------------------
# The task


def infer_task(teacher: nn.Module, hf: Mapping[str, Any] | None, example_output: Any) -> str:
    """The fidelity task of a teacher: from its Hugging Face task, else from its output.

    A Hugging Face model maps by task (causal LM, sequence/image classification, base model =
    embedding). Otherwise an output carrying ``last_hidden_state`` is an embedding, and a 2-D
    float output ``[B, C]`` with ``C >= 2`` is taken as classification logits; anything else is
    compared by relative error.
    """
    if hf is not None and hf.get("task") in HF_TASK_MAP:
        return HF_TASK_MAP[hf["task"]]
    if (
        _field(example_output, "sentence_embedding") is not None
        or _field(example_output, "last_hidden_state") is not None
    ):
        return "embedding"
    config = getattr(teacher, "config", None)
    archs = getattr(config, "architectures", None) or ()
    if any(str(a).endswith("ForCausalLM") for a in archs):
        return "causal_lm"
    try:
        out = primary_output(example_output)
    except TypeError:
        return "output"
    if out.is_floating_point() and out.dim() == 2 and out.shape[-1] >= 2:
        return "classification"
    return "output"


def reference_output(out: Any) -> Any:
    """The part of a teacher's output that ``measure_fidelity`` reads, to cache and pass back as
    its ``teacher`` (the sentence embedding or last hidden state an embedding measure pools, else
    the primary tensor): a language model's key-value cache or extra hidden states are not kept."""
    for key in ("sentence_embedding", "last_hidden_state"):
        value = _field(out, key)
        if value is not None:
            return {key: value}
    return primary_output(out)


def _field(out: Any, key: str) -> torch.Tensor | None:
    value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
    return value if isinstance(value, torch.Tensor) else None


def _attention_mask(batch: Batch) -> torch.Tensor | None:
    mask = batch.kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) else None


# ---------------------------------------------------------------------------------------------
# Accumulators: one per task, fed batch by batch


class _Measure:
    def __init__(self) -> None:
        self.n = 0
        self.nonfinite = 0

    def add(self, t_out: Any, s_out: Any, batch: Batch) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        raise NotImplementedError

    def finite(self, *tensors: torch.Tensor) -> bool:
        bad = sum(int((~torch.isfinite(x)).sum()) for x in tensors if x.is_floating_point())
        self.nonfinite += bad
        return bad == 0


def _same_shape(t: torch.Tensor, s: torch.Tensor) -> None:
    if t.shape != s.shape:
        raise ValueError(f"the student's output has shape {tuple(s.shape)}, the teacher's {tuple(t.shape)}")


class _Classification(_Measure):
    def __init__(self) -> None:
        super().__init__()
        self.agree = 0
        self.kl = 0.0
        self.t_correct = self.s_correct = self.labelled = 0

    def add(self, t_out: Any, s_out: Any, batch: Batch) -> None:
        t, s = primary_output(t_out).double(), primary_output(s_out).double()
        _same_shape(t, s)
        if not self.finite(t, s):
            return
        t, s = t.reshape(-1, t.shape[-1]), s.reshape(-1, s.shape[-1])
        t_top, s_top = t.argmax(-1), s.argmax(-1)
        self.agree += int((t_top == s_top).sum())
        self.kl += float(F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum"))
        self.n += t.shape[0]
        y = batch.target
        if isinstance(y, torch.Tensor) and not y.is_floating_point() and y.numel() == t.shape[0]:
            y = y.reshape(-1)
            self.t_correct += int((t_top == y).sum())
            self.s_correct += int((s_top == y).sum())
            self.labelled += y.numel()

    def result(self) -> dict[str, float]:
        r = {"top1_agreement": self.agree / self.n, "kl": self.kl / self.n}
        if self.labelled:
            r |= {
                "teacher_accuracy": self.t_correct / self.labelled,
                "student_accuracy": self.s_correct / self.labelled,
            }
        return r


def sentence_embedding(out: Any, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, H]``: a model's sentence embedding, or the masked mean of its hidden states over tokens."""
    pooled = _field(out, "sentence_embedding")
    if pooled is not None:
        return pooled
    hidden = _field(out, "last_hidden_state")
    x = hidden if hidden is not None else primary_output(out)
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        return x.reshape(x.shape[0], -1)
    if mask is None or mask.shape != x.shape[:2]:
        return x.mean(1)
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1e-9)


class _Embedding(_Measure):
    def __init__(self) -> None:
        super().__init__()
        self.t: list[torch.Tensor] = []
        self.s: list[torch.Tensor] = []

    def add(self, t_out: Any, s_out: Any, batch: Batch) -> None:
        mask = _attention_mask(batch)
        t = sentence_embedding(t_out, mask).double()
        s = sentence_embedding(s_out, mask).double()
        _same_shape(t, s)
        if not self.finite(t, s):
            return
        self.t.append(t)
        self.s.append(s)
        self.n += t.shape[0]

    def result(self) -> dict[str, float]:
        t, s = torch.cat(self.t), torch.cat(self.s)
        r = {"cosine": float(F.cosine_similarity(t, s, dim=-1).mean())}
        if t.shape[0] >= 3:  # with two samples each one's neighbour is the other: no information
            r["nn_agreement"] = float((_nearest(t) == _nearest(s)).double().mean())
        return r


def _nearest(e: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar other row."""
    e = F.normalize(e, dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(-1)


class _CausalLM(_Measure):
    def __init__(self) -> None:
        super().__init__()
        self.agree = 0
        self.kl = 0.0
        self.nll_t = self.nll_s = 0.0
        self.n_next = 0

    def add(self, t_out: Any, s_out: Any, batch: Batch) -> None:
        t, s = primary_output(t_out).double(), primary_output(s_out).double()
        _same_shape(t, s)
        if not self.finite(t, s):
            return
        mask = _attention_mask(batch)
        valid = (
            mask.bool()
            if mask is not None and mask.shape == t.shape[:2]
            else torch.ones(t.shape[:2], dtype=torch.bool)
        )
        tv, sv = t[valid], s[valid]
        self.agree += int((tv.argmax(-1) == sv.argmax(-1)).sum())
        self.kl += float(F.kl_div(sv.log_softmax(-1), tv.log_softmax(-1), log_target=True, reduction="sum"))
        self.n += tv.shape[0]
        # next-token NLL: position i predicts token i+1 (the input's, else the teacher's choice)
        ids = batch.kwargs.get("input_ids", batch.args[0] if batch.args else None)
        nxt = (
            ids[:, 1:] if isinstance(ids, torch.Tensor) and ids.shape == t.shape[:2] else t.argmax(-1)[:, 1:]
        )
        pair = valid[:, 1:] & valid[:, :-1]
        lt, ls = t[:, :-1].log_softmax(-1), s[:, :-1].log_softmax(-1)
        self.nll_t -= float(lt.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)[pair].sum())
        self.nll_s -= float(ls.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)[pair].sum())
        self.n_next += int(pair.sum())

    def result(self) -> dict[str, float]:
        r = {"next_token_agreement": self.agree / self.n, "kl": self.kl / self.n}
        if self.n_next:
            r["ppl_ratio"] = math.exp((self.nll_s - self.nll_t) / self.n_next)
        return r


def perplexity_ratio(outputs: Iterable[tuple[Any, Any, Batch]]) -> float:
    """``ppl_s / ppl_t`` over ``(teacher output, student output, batch)`` triples of a causal LM,
    as the fidelity table measures it (``_CausalLM``); NaN where an output is non-finite or no
    next-token pair was compared."""
    measure = _CausalLM()
    for t_out, s_out, batch in outputs:
        measure.add(t_out, s_out, batch)
    if measure.nonfinite or not measure.n_next:
        return math.nan
    return measure.result()["ppl_ratio"]


class _Output(_Measure):
    def __init__(self) -> None:
        super().__init__()
        self.err2 = self.ref2 = self.max_abs = 0.0

    def add(self, t_out: Any, s_out: Any, batch: Batch) -> None:
        for t, s in zip(_tensors(t_out), _tensors(s_out), strict=True):
            t, s = t.double(), s.double()
            _same_shape(t, s)
            if not self.finite(t, s):
                continue
            d = s - t
            self.err2 += float((d * d).sum())
            self.ref2 += float((t * t).sum())
            self.max_abs = max(self.max_abs, float(d.abs().max()) if d.numel() else 0.0)
        self.n += batch.size

    def result(self) -> dict[str, float]:
        rel = (
            math.sqrt(self.err2) / math.sqrt(self.ref2)
            if self.ref2 > 0
            else (0.0 if self.err2 == 0 else math.inf)
        )
        return {"rel_error": rel, "max_abs": self.max_abs}


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every floating tensor of an output (a tensor, a tuple/list, a dict or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    elif hasattr(out, "to_tuple"):
        out = list(out.to_tuple())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


_MEASURES: dict[str, type[_Measure]] = {
    "classification": _Classification, "embedding": _Embedding, "causal_lm": _CausalLM, "output": _Output,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The measurement


def _score(task: str, measures: Mapping[str, float]) -> float:
    if task == "output":
        return max(0.0, 1.0 - measures["rel_error"])
    return float(measures[PRIMARY[task]])


@torch.no_grad()
def measure_fidelity(
    teacher: nn.Module | Sequence[Any],
    student: nn.Module,
    batches: Callable[[], Iterable[Any]] | Iterable[Any],
    task: str | None = None,
) -> Fidelity:
    """Measure ``student`` against ``teacher`` on ``batches`` (a data function or an iterable).

    ``teacher`` is a module, or its outputs on ``batches`` in order (when the teacher is the
    student itself under hooks, or its outputs are cached). ``task`` defaults to
    :func:`infer_task` on the teacher's output for the first batch. Both models run in eval mode
    without gradients (their modes are restored after); the result is deterministic for
    deterministic models. Raises ``ValueError`` when the outputs' shapes differ and ``InputError``
    when there are no batches.

    >>> net = nn.Linear(4, 3)
    >>> measure_fidelity(net, net, [torch.randn(5, 4)]).score
    1.0
    """
    if task is not None and task not in TASKS:
        raise InputError(f"fidelity task '{task}': expected one of {', '.join(TASKS)}")
    module = teacher if isinstance(teacher, nn.Module) else None
    cached = iter(()) if module is not None else iter(cast(Sequence[Any], teacher))
    modes = [(m, m.training) for m in (module, student) if m is not None]
    for m, _ in modes:
        m.eval()
    acc: _Measure | None = None
    try:
        for batch in iter_batches(batches):
            t_out = batch.run(module) if module is not None else next(cached)
            s_out = batch.run(student)
            if acc is None:
                task = task or infer_task(module if module is not None else student, None, t_out)
                acc = _MEASURES[task]()
            acc.add(t_out, s_out, batch)
    finally:
        for m, training in modes:
            m.train(training)
    if acc is None or task is None:
        raise InputError("no held-out batches to measure fidelity on; give more calibration data")
    if acc.nonfinite or acc.n == 0:
        return Fidelity(task, math.nan, {"nonfinite": float(acc.nonfinite)}, acc.n)
    measures = acc.result()
    return Fidelity(task, _score(task, measures), measures, acc.n)


def fidelity_floor(profile: Any) -> float:
    """The floor a student's score must reach: the profile's ``min_fidelity``, else the default."""
    value = getattr(profile, "min_fidelity", None)
    return DEFAULT_MIN_FIDELITY if value is None else float(value)


def student_fidelity(state: CompileState, student: Student, key: str = "fidelity") -> Fidelity | None:
    """Measure ``student`` against ``state.teacher`` on the held-out split; store it in ``student.metrics[key]``.

    Returns None (and stores nothing) when the state has no held-out data. The task is inferred
    once per state from the teacher's output on the example inputs (``infer_task``).
    """
    heldout = state.heldout_data
    if heldout is None:
        return None
    task = state.records.get("_fidelity_task")
    if task is None:
        task = infer_task(state.teacher, state.hf, state.run_model(state.teacher))
        state.records["_fidelity_task"] = task
    fid = measure_fidelity(state.teacher, student.module, heldout, task)
    student.metrics[key] = fid.to_dict()
    return fid


# ---------------------------------------------------------------------------------------------
# The pass (``record`` measures the final students; this one measures a stage before that)


@dataclass(frozen=True)
class FidelityOptions:
    #: the stage measured (e.g. before_distill): the result goes to ``student.metrics["fidelity_<stage>"]``
    stage: str

    def __post_init__(self) -> None:
        if not self.stage.isidentifier():
            raise ValueError(f"stage={self.stage!r}: expected a name such as before_distill")


@register_pass
class FidelityPass(Pass):
    """Measure every student of the state against the teacher on the held-out split, now."""

    in_place = False  # reads weights only

    name = "fidelity"
    Options = FidelityOptions

    def run(self, state: CompileState) -> PassResult:
        if state.heldout_data is None:
            raise InputError("pass 'fidelity': there are no held-out batches to measure on; give --calib")
        for student in state.students or [state.working()]:
            student_fidelity(state, student, f"fidelity_{self.options.stage}")
        return PassResult(state, False)
