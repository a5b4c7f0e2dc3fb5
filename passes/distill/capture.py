"""Run a model on a batch and capture what distillation losses read from it.

A loss may need more than the primary output ``z`` (logits / last hidden state): the per-layer
hidden states ``h_1..h_L`` and attention probabilities ``A_1..A_L``. For Hugging Face models they
come from ``output_hidden_states=True`` / ``output_attentions=True`` (``hidden_states[0]`` is the
embedding output, kept apart); for any other ``nn.Module`` from forward hooks on named submodules.

A student may also be a *configuration* of a module (an elastic supernet's subnet): then a
``forward(module, batch, config)`` callable produces its output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from potstill.errors import InputError
from potstill.inputs.data import Batch, primary_output
from potstill.inputs.hf import is_hf
from torch import nn

#: ``forward(module, batch, config) -> model output``: how a (module, config) student runs.
ForwardFn = Callable[[nn.Module, Batch, Any], Any]


@dataclass(frozen=True)
class Want:
    """What a loss reads from one model besides the primary output."""

    hidden: bool = False
    attentions: bool = False
    #: submodules whose outputs are the hidden states (non-HF models, in layer order)
    modules: tuple[str, ...] = ()
    #: submodules whose outputs are attention probabilities (non-HF models)
    attention_modules: tuple[str, ...] = ()

    def __or__(self, other: Want) -> Want:
        mods = tuple(dict.fromkeys(self.modules + other.modules))
        att = tuple(dict.fromkeys(self.attention_modules + other.attention_modules))
        return Want(self.hidden or other.hidden, self.attentions or other.attentions, mods, att)


@dataclass
class ModelOutputs:
    """One model's outputs on one batch."""

    raw: Any
    logits: torch.Tensor
    hidden: list[torch.Tensor] = field(default_factory=list)
    embeddings: torch.Tensor | None = None
    attentions: list[torch.Tensor] = field(default_factory=list)

    def detached(self) -> ModelOutputs:
        return ModelOutputs(
            None,
            self.logits.detach(),
            [h.detach() for h in self.hidden],
            None if self.embeddings is None else self.embeddings.detach(),
            [a.detach() for a in self.attentions],
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "device_ids") else model


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return primary_output(out)


def run_model(
    model: nn.Module,
    batch: Batch,
    want: Want = Want(),
    forward: ForwardFn | None = None,
    config: Any = None,
) -> ModelOutputs:
    """Run ``model`` on ``batch``, capturing hidden states / attentions as ``want`` asks."""
    base = unwrap(model)
    kwargs = dict(batch.kwargs)
    hf = is_hf(unwrap(base))
    if hf and (want.hidden or want.attentions):
        kwargs["return_dict"] = True
        if want.hidden:
            kwargs["output_hidden_states"] = True
        if want.attentions:
            kwargs["output_attentions"] = True
    elif want.attentions and not want.attention_modules:
        raise InputError(
            f"{type(base).__name__} is not a Hugging Face model: give the attention modules to hook "
            "(loss option student_modules / teacher_modules)"
        )
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in dict.fromkeys(want.modules + want.attention_modules):
        try:
            sub = base.get_submodule(name)
        except AttributeError as e:
            raise InputError(f"{type(base).__name__} has no submodule '{name}' to capture") from e

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            captured[name] = _first_tensor(out)

        handles.append(sub.register_forward_hook(hook))
    try:
        run_batch = Batch(batch.args, kwargs, batch.target)
        if forward is not None:
            raw = forward(model, run_batch, config)
        elif config is not None:
            raise InputError("a student given as (module, config) needs a forward(module, batch, config)")
        else:
            raw = run_batch.run(model)
    finally:
        for h in handles:
            h.remove()
    out = ModelOutputs(raw, primary_output(raw))
    out.hidden = [captured[n] for n in want.modules]
    out.attentions = [captured[n] for n in want.attention_modules]
    if hf and not want.modules and not want.attention_modules:
        states = getattr(raw, "hidden_states", None)
        if want.hidden and states:
            out.embeddings, out.hidden = states[0], list(states[1:])
        atts = getattr(raw, "attentions", None)
        if want.attentions and atts:
            out.attentions = list(atts)
    elif want.hidden and not want.modules:
        raise InputError(
            f"{type(base).__name__} is not a Hugging Face model: name the layers whose outputs to "
            "match (loss options student_modules / teacher_modules)"
        )
    return out
