"""The default repair: label-free distillation chosen by what the teacher computes.

When training data is at hand, the default pipeline distils every pruned student from its teacher
on that data, with no labels: the student learns the teacher's outputs (Hinton et al. 2015,
arXiv 1503.02531), the objective depending on the fidelity task (``potstill.fidelity.infer_task``):

==============  ==================================================================  ===================
task            objective                                                           teacher outputs
==============  ==================================================================  ===================
classification  ``kd``: ``T² KL(p_t^T || q_s^T)`` on the logits, lr probed among      cached (whole); live
                1e-3, 2.5e-4, 6.25e-5                                               when images are
                                                                                    augmented
embedding       ``cosine+hidden``: ``1 − cos`` of mean-pooled embeddings + MSE of     live
                every layer's hidden states (TinyBERT, arXiv 1909.10351), lr
                probed among 2e-4, 5e-5, 1.25e-5
causal_lm       ``kd`` on next-token logits, lr probed among 1e-4, 2.5e-5, 6.25e-6  cached, top 64
output          ``kd`` on the primary output (the pass's defaults)                  live
==============  ==================================================================  ===================

The teacher's outputs are cached once per compile (``teacher_cache``) where that saves its forward
pass on later epochs and students: the logits of a classifier, and a decoder's top 64 logits per
token (a 49k vocabulary is 196 KB per token in fp32, the top 64 about 0.5 KB). An encoder's
hidden states of every layer would take about 0.7 MB per 64-token sentence, so an encoder's
teacher runs live. Augmented images are new every step, so their teacher runs live too.

The lr of a pretrained encoder or decoder is lower than the pass's default (1e-3, which suits
small CNNs): AdamW at 1e-3 moves a pretrained transformer off its solution within a few steps
(``bench/distill_minilm.py`` trained MiniLM at 2e-4). Yet no one lower lr suits every student: five
minutes at 2e-4 raised the held-out loss of MiniLM pruned lightly (``--ratio 0.1``), which 5e-5
lowered, while at ``--ratio 0.35`` 2e-4 did better than 5e-5. So the task's lr is not given but
probed (``lr_probe``): the default pipeline passes ``lr_probe=[lr, lr/4, lr/16]``, a short run of
each from the same start is scored on the held-out batches, and training goes on from the best
(the probe counts against ``minutes``). A classifier's lr is probed too, from the pass's 1e-3 down:
1e-3 suits a small CNN distilled for a few epochs, and is far above what fine-tunes a pretrained
ImageNet network (EfficientNet-Lite0 on 20 photos). An lr the recipe's ``train:`` gives is used as
it is, with no probe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: the options the default pipeline gives ``distill`` per fidelity task (before epochs and minutes)
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"method": "kd", "lr": 1e-3, "teacher_outputs": "cached"},
    "embedding": {"method": "cosine+hidden", "lr": 2e-4},
    "causal_lm": {"method": "kd", "lr": 1e-4, "teacher_outputs": "cached", "teacher_top_k": 64},
    "output": {},
}
#: the candidates of a pretrained teacher's lr probe, as fractions of its task's lr
PROBE_FRACTIONS = (1.0, 1 / 4, 1 / 16)


def lr_candidates(lr: float) -> tuple[float, ...]:
    """The lr probe's candidates around a task's pretrained lr: ``lr``, ``lr/4``, ``lr/16``."""
    return tuple(float(f"{lr * f:.6g}") for f in PROBE_FRACTIONS)


def default_distill_options(
    task: str, *, epochs: int | None, minutes: float | None, images: bool, augment: bool = True,
    given: Iterable[str] = (),
) -> dict[str, Any]:
    """The ``distill`` options of the default pipeline; ``given``: options a recipe's ``train:`` sets
    (left to it). ``images``: the teacher takes images (augmentation runs unless ``augment`` is False)."""
    opts = dict(TASK_DEFAULTS.get(task, {}))
    if images and augment:
        opts.pop("teacher_outputs", None)  # each step's view is new: the teacher runs live
        opts.pop("teacher_top_k", None)
    elif images:
        opts["augment"] = False
    if epochs is not None:
        opts["epochs"] = epochs
    if minutes is not None:
        opts["minutes"] = minutes
    skip = set(given)
    if "teacher_outputs" in skip:
        opts.pop("teacher_top_k", None)
    if "lr" not in skip:  # a pretrained teacher's lr: chosen by the probe among its candidates
        opts = {("lr_probe" if k == "lr" else k): lr_candidates(v) if k == "lr" else v for k, v in opts.items()}
    return {k: v for k, v in opts.items() if k not in skip}


def _format(value: Any) -> str:
    """A spec value YAML reads back as written (``5e-05`` alone would read as a string)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = f"{value:g}"
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text
    return str(value)


def distill_spec(options: dict[str, Any]) -> str:
    """``distill{k=v,...}`` (``distill`` alone without options)."""
    inner = ",".join(f"{k}={_format(v)}" for k, v in options.items())
    return f"distill{{{inner}}}" if inner else "distill"
