"""Export a module to one self-contained ONNX file, checked by ``onnx.checker``.

The module is wrapped so that every tensor input is a named positional input (positional
arguments take the names of ``forward``'s parameters; keyword arguments such as Hugging Face's
``input_ids``, ``attention_mask``, ``token_type_ids`` keep their names) and the one output is the
primary output (``potstill.data.primary_output``: logits, last hidden state, or the first tensor),
named ``output``. Exporter: ``torch.onnx.export(dynamo=True)``, weights inline unless the model
passes protobuf's 2 GB limit (then in ``model.onnx.data``, see ``large_onnx``); if that fails,
the TorchScript exporter, and the notes say so. The batch dimension is dynamic unless a batch is
fixed.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from potstill.data import primary_output
from potstill.errors import PotstillError
from torch import nn

from .large_onnx import check_onnx, needs_external_data, onnx_destination

OUTPUT_NAME = "output"


class FlatInputs(nn.Module):
    """``forward(*tensors)`` -> primary output of ``module(*args, **kwargs)`` (non-tensors fixed)."""

    def __init__(self, module: nn.Module, n_args: int, kw_names: Sequence[str], fixed: dict[str, Any]) -> None:
        super().__init__()
        self.module = module
        self.n_args = n_args
        self.kw_names = list(kw_names)
        self.fixed = dict(fixed)

    def forward(self, *flat: torch.Tensor) -> torch.Tensor:
        args = flat[: self.n_args]
        kwargs = dict(zip(self.kw_names, flat[self.n_args :]))
        kwargs.update(self.fixed)
        return primary_output(self.module(*args, **kwargs))


@dataclass
class FlatSpec:
    """How a call's inputs map to the ONNX graph's named inputs."""

    names: list[str]
    n_args: int
    kw_names: list[str]
    fixed: dict[str, Any] = field(default_factory=dict)

    def flatten(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        return [*args[: self.n_args], *(kwargs[k] for k in self.kw_names)]

    def feeds(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        return {n: t.detach().cpu().numpy() for n, t in zip(self.names, self.flatten(args, kwargs))}


def flat_spec(module: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> FlatSpec:
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise PotstillError(f"positional input {i} is a {type(a).__name__}; engines take tensors only")
    try:
        params = [
            p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    arg_names = [params[i] if i < len(params) else f"input_{i}" for i in range(len(args))]
    kw_names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    return FlatSpec(arg_names + kw_names, len(args), kw_names, fixed)


@dataclass
class OnnxExport:
    path: Path
    spec: FlatSpec
    exporter: str
    notes: list[str] = field(default_factory=list)
    output_name: str = OUTPUT_NAME


def export_onnx(
    module: nn.Module,
    args: Sequence[Any],
    path: str | Path,
    kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
) -> OnnxExport:
    """Write ``module`` as an ONNX file at ``path`` (atomically) and check it; past 2 GB the weights
    go to ``<name>.data`` beside it (``large_onnx``)."""
    kwargs = kwargs or {}
    module = module.eval()
    spec = flat_spec(module, args, kwargs)
    wrapper = FlatInputs(module, spec.n_args, spec.kw_names, spec.fixed).eval()
    flat = tuple(spec.flatten(args, kwargs))
    dynamic_axes: dict[str, dict[int, str]] | None = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n, t in zip(spec.names, flat) if t.dim() > 0}
        dynamic_axes[OUTPUT_NAME] = {0: "batch"}
        flat = batch_of_two(flat)
    notes: list[str] = []
    path = Path(path)
    external = needs_external_data(module)  # protobuf's 2 GB limit: weights go to <name>.data
    with onnx_destination(path) as tmp:
        try:
            _export(wrapper, flat, tmp, spec.names, dynamic_axes, dynamo=True, external_data=external)
            exporter = "torch.onnx dynamo"
        except Exception as e:  # the dynamo exporter fails on some graphs: fall back and say so
            notes.append(f"dynamo ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "used the TorchScript exporter")
            try:
                _export(wrapper, flat, tmp, spec.names, dynamic_axes, dynamo=False)
            except Exception as e2:
                raise PotstillError(f"ONNX export failed with both exporters: {type(e2).__name__}: {e2}") from e2
            exporter = "torch.onnx torchscript"
        try:
            check_onnx(tmp)
        except Exception as e:
            raise PotstillError(f"{path}: exported ONNX fails onnx.checker: {e}") from e
    return OnnxExport(path, spec, exporter, notes)


def _export(
    wrapper: nn.Module,
    flat: tuple[torch.Tensor, ...],
    path: Path,
    names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
    *,
    dynamo: bool,
    external_data: bool = False,
) -> None:
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        if dynamo:
            # forward(*flat): one dynamic_shapes entry for the varargs tuple, one spec per tensor
            shapes = None
            if dynamic_axes is not None:
                batch = torch.export.Dim("batch", min=1, max=65536)
                shapes = (tuple({0: batch} if t.dim() > 0 else None for t in flat),)
            torch.onnx.export(
                wrapper, flat, str(path), dynamo=True, external_data=external_data, input_names=names,
                output_names=[OUTPUT_NAME], dynamic_shapes=shapes, verbose=False,
            )
        else:
            torch.onnx.export(
                wrapper, flat, str(path), dynamo=False, input_names=names, output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes, verbose=False,
            )


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a library logger for the duration (the exporter logs optional-op notices as warnings)."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def batch_of_two(flat: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Repeat batch-1 inputs to batch 2: torch.export specialises a size-1 dim to a constant."""
    return tuple(t.repeat(2, *([1] * (t.dim() - 1))) if t.dim() > 0 and t.shape[0] == 1 else t for t in flat)
