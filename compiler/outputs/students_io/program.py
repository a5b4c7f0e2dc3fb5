"""``student.pt2``: one ``torch.export`` program per student, its batch dynamic where it can be.

``save_program`` exports the student at the example inputs (repeated to a batch of two, since a
batch of one cannot be dynamic) with a dynamic batch dimension; when ``torch.export`` pins the batch
it saves a static one and says why. Two wrappers make programs ``torch.export.save`` can write:
``PlainOutputs`` turns Hugging Face ``ModelOutput`` classes into dicts, and ``PlainCausalMask``
builds a decoder's causal mask from plain tensor ops (transformers' mask code uses ``flat_apply``),
for an example given by keyword (``hf:`` teachers) or positionally (``file.py:FACTORY`` teachers).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from potstill.inputs.data import Batch
from torch import nn


def example_batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    return Batch(tuple(args), dict(kwargs)).size


def rebatch(args: tuple[Any, ...], kwargs: Mapping[str, Any], batch: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Repeat the example along the batch dim to ``batch`` rows (a batch of 1 cannot be dynamic)."""
    size = example_batch_size(args, kwargs)

    def grow(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == size and size != batch:
            reps = -(-batch // size)
            return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch]
        return x

    return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}


def _dynamic_shapes(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)

    def spec(x: Any) -> Any:
        return {0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    params = inspect.signature(module.forward).parameters
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: spec(v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(spec(v) for v in value)
        else:
            shapes[name] = spec(value)
    return shapes


def _plain(value: Any) -> Any:
    """Outputs with only built-in containers: a Hugging Face ``ModelOutput`` becomes a dict."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value) if type(value) in (tuple, list) else tuple(_plain(v) for v in value)
    return value


def _needs_plain(value: Any) -> bool:
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (int, float, bool)):
        return False
    if type(value) in (tuple, list):
        return any(_needs_plain(v) for v in value)
    if type(value) is dict:
        return any(_needs_plain(v) for v in value.values())
    return True


class PlainOutputs(nn.Module):
    """Wraps a model whose outputs are classes ``torch.export.load`` cannot rebuild (HF ``ModelOutput``).

    ``forward`` takes the wrapped model's signature, so dynamic shapes are named as for the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

        def forward(*args: Any, **kwargs: Any) -> Any:
            return _plain(self.model(*args, **kwargs))

        forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
        self.forward = forward


def save_program(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    path: Path,
    fixed_batch: int | None = None,
) -> dict[str, Any]:
    """``torch.export`` the module to ``path`` (a ``.pt2``); batch dynamic unless ``fixed_batch``.

    Returns ``{"file", "dynamic_batch", "note"}``; a model whose batch cannot be made dynamic is
    saved with a static batch and the note says why.
    """
    module = module.eval()
    if not isinstance(module, PlainCausalMask) and (wrapped := plain_mask_module(module, kwargs, args)) is not None:
        # decoders: one export that saves, rather than one that torch.export.save refuses and a second
        saved = save_program(wrapped, args, kwargs, path, fixed_batch)
        if saved["file"]:
            why = ("the causal mask is built from attention_mask with plain tensor ops (transformers' mask "
                   "code uses higher-order ops such as flat_apply, which torch.export.save cannot always serialize)")
            saved["note"] = f"{saved['note']}; {why}" if saved["note"] else why
            return saved
    note = ""
    dynamic = fixed_batch is None
    args, kw = rebatch(args, kwargs, fixed_batch or 2)
    with torch.no_grad():
        if _needs_plain(module(*args, **kw)):
            module = PlainOutputs(module)
            note = "outputs saved as a dict of tensors (the model returns a class torch.export.load cannot rebuild)"
    program = None
    if dynamic:
        try:
            program = torch.export.export(module, args, kw, dynamic_shapes=_dynamic_shapes(module, args, kw), strict=False)
        except Exception as e:  # export names the guard that fixed the batch; keep it for the manifest
            dynamic = False
            reason = f"batch could not be made dynamic ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            note = f"{note}; {reason}" if note else reason
    if program is None:
        program = torch.export.export(module, args, kw, strict=False)
    try:
        torch.export.save(program, str(path))
    except Exception as e:  # e.g. higher-order ops (flat_apply in HF mask code) torch cannot serialize yet
        path.unlink(missing_ok=True)
        reason = (f"not written: torch.export cannot serialize this program ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160]}); load the student with potstill.load_student")
        return {"file": None, "dynamic_batch": dynamic, "note": f"{note}; {reason}" if note else reason}
    return {"file": path.name, "dynamic_batch": dynamic, "note": note}


class PlainCausalMask(nn.Module):
    """``forward(input_ids, attention_mask)`` of a Hugging Face decoder with the 4-D causal mask
    built from plain tensor ops.

    transformers (>= 4.53) builds decoder masks through ``flat_apply``, a higher-order op that
    ``torch.export.save`` cannot serialize. Given a 4-D float mask, the models skip that code
    (``mask[b, 0, q, k] = 0`` where key ``k <= q`` is not padding, else the dtype's minimum, as their
    eager mask is), so the exported program holds only aten ops.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        if attention_mask is None:  # a teacher whose example is the token ids alone (a file factory's)
            attention_mask = torch.ones_like(input_ids)
        n = input_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
        keep = causal[None, None] & attention_mask[:, None, None, :].bool()
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(keep.shape, dtype=dtype, device=input_ids.device)
        mask = mask.masked_fill(~keep, torch.finfo(dtype).min)
        return self.model(input_ids=input_ids, attention_mask=mask)


def plain_mask_module(module: nn.Module, kwargs: Mapping[str, Any], args: tuple[Any, ...] = ()) -> nn.Module | None:
    """``PlainCausalMask(module)`` when it computes what ``module`` computes on the example (a causal
    decoder with unpadded and padded rows checked), else None (encoders, sliding windows, ...).

    The example is ``kwargs``, or positional ``args`` bound to the forward's parameter names (a
    ``file.py:FACTORY`` teacher's ``example_inputs()`` gives ``(input_ids,)``)."""
    from potstill.inputs.data import primary_output

    named = dict(kwargs)
    if args:
        try:
            named = dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
        except (TypeError, ValueError):
            return None
    ids, mask = named.get("input_ids"), named.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or set(named) - {"input_ids", "attention_mask"}:
        return None
    if args and tuple(named)[: len(args)] != ("input_ids", "attention_mask")[: len(args)]:
        return None  # the wrapper takes (input_ids, attention_mask) positionally in that order
    mask = torch.ones_like(ids) if not isinstance(mask, torch.Tensor) else mask
    wrapped = PlainCausalMask(module).eval()
    padded = mask.clone()
    padded[:, -max(1, ids.shape[1] // 4):] = 0  # right padding: the valid rows must agree too
    try:
        with torch.no_grad():
            for m in (mask, padded):
                a = primary_output(module(input_ids=ids, attention_mask=m))
                b = primary_output(wrapped(ids, m))
                valid = m.bool()
                if a.shape != b.shape or not torch.allclose(a[valid], b[valid], atol=1e-5, rtol=1e-4):
                    return None
    except Exception:  # a model that does not take a 4-D mask: no wrapper
        return None
    return wrapped
