"""Export a module to ONNX (one self-contained file up to 2 GB), checked by ``onnx.checker``.

The module is wrapped so that every tensor input is a named positional input (positional
arguments take the names of ``forward``'s parameters; keyword arguments such as Hugging Face's
``input_ids``, ``attention_mask``, ``token_type_ids`` keep their names). The first output is the
primary output (``potstill.inputs.data.primary_output``: logits, last hidden state, or the first tensor),
named ``output``; every other tensor the model returns (tuple items, dict or ``ModelOutput``
fields) follows as ``output.<key>``, and the notes name any non-tensor output left out.
Exporter: ``torch.onnx.export(dynamo=True, optimize=False)`` and then ``fold_and_clean`` (constant
folding and ten of onnxscript's rewrite rules, see there); if that fails, the TorchScript
exporter, and the notes say so.

Shapes: the batch dimension is dynamic unless a batch is fixed; the token dimension of text inputs
(``input_ids``, ``attention_mask``, ``token_type_ids``, ``position_ids``) is dynamic too, up to the
model's ``max_position_embeddings``, as Optimum's ONNX configs declare them (``{0: "batch_size",
1: "sequence_length"}``). When ``torch.export`` cannot keep the sequence symbolic, the engine keeps the
example's length and the notes say why.
Weights stay inline unless the model passes protobuf's 2 GB limit; then they go to
``model.onnx.data`` beside it (see ``large_onnx``).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from potstill.errors import PotstillError
from potstill.inputs.data import primary_output
from potstill.inputs.ssm import scan_friendly_ssm
from torch import nn

from .large_onnx import check_onnx, needs_external_data, onnx_destination

OUTPUT_NAME = "output"
#: inputs whose dim 1 counts tokens (dynamic "sequence" axis)
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids",
               "decoder_attention_mask", "input_values")
#: the name of each input's dim-1 axis: a decoder's tokens and a waveform's samples have lengths of their own
AXIS_NAMES = {"decoder_input_ids": "decoder_sequence", "decoder_attention_mask": "decoder_sequence",
              "input_values": "samples"}


def output_leaves(out: Any, prefix: str = "") -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Every tensor in a model's output with a name (dict keys, tuple positions), and the names of
    non-tensor leaves (caches, strings) that an engine cannot return."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "0", out)], []
    if out is None:
        return [], []
    items: list[tuple[str, Any]]
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(out)]
    else:
        return [], [f"{prefix or 'output'} ({type(out).__name__})"]
    tensors: list[tuple[str, torch.Tensor]] = []
    skipped: list[str] = []
    for key, value in items:
        t, sk = output_leaves(value, f"{prefix}.{key}" if prefix else key)
        tensors += t
        skipped += sk
    return tensors, skipped


def ordered_outputs(out: Any) -> tuple[list[str], list[torch.Tensor], list[str]]:
    """(names, tensors, skipped): the primary output first as ``output``, then the others."""
    primary = primary_output(out)
    leaves, skipped = output_leaves(out)
    names, tensors = [OUTPUT_NAME], [primary]
    for key, t in leaves:
        if t is not primary:
            names.append(f"{OUTPUT_NAME}.{key}")
            tensors.append(t)
    return names, tensors, skipped


class FlatInputs(nn.Module):
    """``forward(*tensors)`` -> (primary output, other tensor outputs...) of ``module(*args, **kwargs)``
    (non-tensor keyword arguments fixed)."""

    def __init__(self, module: nn.Module, n_args: int, kw_names: Sequence[str], fixed: dict[str, Any],
                 all_outputs: bool = False) -> None:
        super().__init__()
        self.module = module
        self.n_args = n_args
        self.kw_names = list(kw_names)
        self.fixed = dict(fixed)
        self.all_outputs = all_outputs

    def forward(self, *flat: torch.Tensor) -> Any:
        args = flat[: self.n_args]
        kwargs = dict(zip(self.kw_names, flat[self.n_args :]))
        kwargs.update(self.fixed)
        out = self.module(*args, **kwargs)
        if not self.all_outputs:
            return primary_output(out)
        return tuple(ordered_outputs(out)[1])


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
    #: every graph output, the primary (``output_name``) first
    output_names: list[str] = field(default_factory=lambda: [OUTPUT_NAME])
    #: input name -> {dim: axis name} of the symbolic dims in the graph
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


def sequence_inputs(names: Sequence[str], flat: Sequence[torch.Tensor]) -> list[str]:
    """Text inputs (token ids and their masks) whose dim 1 is the sequence."""
    return [n for n, t in zip(names, flat) if n in TEXT_INPUTS and t.dim() == 2 and t.shape[1] > 1]


def max_sequence(module: nn.Module) -> int:
    """The longest sequence the model's position tables allow (65536 without a config)."""
    config = getattr(module, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return 1 << 16


def export_onnx(
    module: nn.Module,
    args: Sequence[Any],
    path: str | Path,
    kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = True,
) -> OnnxExport:
    """Write ``module`` as an ONNX file at ``path`` (atomically) and check it; past 2 GB the weights
    go to ``<name>.data`` beside it (``large_onnx``)."""
    kwargs = kwargs or {}
    module = module.eval()
    spec = flat_spec(module, args, kwargs)
    flat = tuple(spec.flatten(args, kwargs))
    with torch.no_grad():
        out_names, _, skipped = ordered_outputs(module(*args, **kwargs))
    notes: list[str] = []
    if len(out_names) > 1 or skipped:
        kept = ", ".join(out_names)
        notes.append(f"engine outputs: {kept} ('output' is the primary output)"
                     + (f"; not lowered (not tensors): {', '.join(skipped)}" if skipped else ""))
    wrapper = FlatInputs(module, spec.n_args, spec.kw_names, spec.fixed, all_outputs=True).eval()
    seq = sequence_inputs(spec.names, flat) if dynamic_sequence else []
    if dynamic_batch:
        flat = batch_of_two(flat)
    attempts = [(dynamic_batch, seq)] + ([(dynamic_batch, [])] if seq else [])
    path = Path(path)
    exporter = ""
    external = needs_external_data(module)  # protobuf's 2 GB limit: weights go to <name>.data
    with onnx_destination(path) as tmp:
        errors: list[str] = []
        axes: dict[str, dict[int, str]] = {}
        # state-space mixers run their recurrence as one scan, not a loop unrolled over the tokens
        with scan_friendly_ssm(module) as scans:
            for batch, seq_names in attempts:
                axes = _axes(spec.names, flat, batch, seq_names)
                try:
                    _export(wrapper, flat, tmp, spec.names, out_names, axes, max_sequence(module), dynamo=True,
                            external_data=external, export_first=scans > 0)
                    exporter = "torch.onnx dynamo"
                    break
                except Exception as e:  # the dynamo exporter fails on some graphs: try less, then fall back
                    errors.append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
        if scans and exporter:
            notes.append(f"{scans} state-space mixer(s) exported with their recurrence as an ONNX Scan over time")
        if not exporter:
            axes = _axes(spec.names, flat, dynamic_batch, [])
            notes.append(f"dynamo ONNX export failed ({errors[-1]}); used the TorchScript exporter")
            try:
                _export(wrapper, flat, tmp, spec.names, out_names, axes, max_sequence(module), dynamo=False)
            except Exception as e2:
                raise PotstillError(f"ONNX export failed with both exporters: {type(e2).__name__}: {e2}") from e2
            exporter = "torch.onnx torchscript"
        if seq and not any(1 in d for d in axes.values()):
            notes.append(f"sequence length fixed at {flat[spec.names.index(seq[0])].shape[1]} tokens: "
                         f"torch.export could not keep it symbolic ({errors[0]})")
        try:
            check_onnx(tmp)
        except Exception as e:
            raise PotstillError(f"{path}: exported ONNX fails onnx.checker: {e}") from e
    return OnnxExport(path, spec, exporter, notes, output_names=out_names, dynamic_axes=axes)


def _axes(names: Sequence[str], flat: Sequence[torch.Tensor], batch: bool,
          seq_names: Sequence[str]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for n, t in zip(names, flat):
        dims = {0: "batch"} if batch and t.dim() > 0 else {}
        if n in seq_names:
            dims[1] = AXIS_NAMES.get(n, "sequence")
        if dims:
            axes[n] = dims
    return axes


def _export(
    wrapper: nn.Module,
    flat: tuple[torch.Tensor, ...],
    path: Path,
    names: list[str],
    out_names: list[str],
    axes: dict[str, dict[int, str]],
    max_seq: int,
    *,
    dynamo: bool,
    external_data: bool = False,
    export_first: bool = False,
) -> None:
    """``export_first``: capture with ``torch.export.export`` and hand the program to the exporter
    (the exporter's own capture of a graph with a ``scan`` fails in its decomposition)."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        if dynamo:
            # forward(*flat): one dynamic_shapes entry for the varargs tuple, one spec per tensor
            dims = {"batch": torch.export.Dim("batch", min=1, max=65536),
                    "sequence": torch.export.Dim("sequence", min=1, max=max_seq),
                    "decoder_sequence": torch.export.Dim("decoder_sequence", min=1, max=max_seq),
                    # a tenth of a second at 16 kHz: convolutional feature encoders need a receptive field
                    "samples": torch.export.Dim("samples", min=1600, max=1 << 24)}
            shapes = (tuple({d: dims[a] for d, a in axes[n].items()} if n in axes else None for n in names),)
            source: Any = wrapper
            if export_first:
                source = torch.export.export(wrapper, flat, dynamic_shapes=shapes if axes else None, strict=False)
            program = torch.onnx.export(
                source, flat, dynamo=True, optimize=False, input_names=names,
                output_names=out_names, dynamic_shapes=None if export_first or not axes else shapes, verbose=False,
            )
            if program is None:  # dynamo=True without a file returns the ONNXProgram
                raise PotstillError("torch.onnx.export returned no ONNX program")
            if export_first and axes:  # a captured program names its axes by symbol (s0, s1): name them
                with contextlib.suppress(Exception):
                    program._rename_dynamic_axes(shapes)
            fold_and_clean(program.model)
            program.save(str(path), external_data=external_data)
        else:
            out_axes = {n: {0: "batch"} for n in out_names} if any(0 in d for d in axes.values()) else {}
            torch.onnx.export(
                wrapper, flat, str(path), dynamo=False, input_names=names, output_names=out_names,
                dynamic_axes={**axes, **out_axes} or None, verbose=False,
            )


def fold_and_clean(model: Any) -> None:
    """onnxscript's optimiser with ten of its rewrite rules, in place on an ``onnx_ir.Model``: inline
    functions; fold constants (shape inference on) and apply the no-op, BatchNorm-into-Conv/Gemm and
    Pad-into-Conv rules, twice at most; then drop dead nodes, functions and opsets, lift constants to
    initializers, deduplicate them, eliminate common subexpressions and fix names.

    ``onnxscript.optimizer.optimize_ir`` matches all ~60 default rules against every node, twice. On
    a decoder that is a third of the export (Llama 123M: 24.4 s against 15.3 s), and ONNX Runtime
    gained nothing from the other rules in ``bench/export_optimizer.py`` (ResNet-18, EfficientNet-Lite0,
    MiniLM, Llama), while folding and the BatchNorm fusion matter (EfficientNet-Lite0 without them:
    582 nodes and 1.7-2x the latency; NNCF's INT8 graph is slower than FP32 with BatchNorm unfused).
    An onnxscript without the public rule names gets the full optimiser."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import optimize_ir

    try:
        from onnxscript.optimizer import fold_constants_ir
        from onnxscript.rewriter import RewritePass
        from onnxscript.rewriter.rules import common as rules
    except ImportError:  # an onnxscript without these public names: its full optimiser
        optimize_ir(model)
        return
    common.InlinePass()(model)
    rewrite = RewritePass([
        rules.add_0_rule, rules.sub_0_rule, rules.mul_by_1_rule, rules.div_by_1_rule, rules.dropout_zero_rule,
        rules.dropout_inference_rule, rules.fuse_batchnorm_into_conv_rule,
        rules.fuse_batchnorm_into_conv_transpose_rule, rules.fuse_batchnorm_into_gemm_rule,
        rules.fuse_pad_into_conv_rule,
    ])  # fmt: skip
    for _ in range(2):  # a fold can expose a fusion and a fusion a fold (as optimize_ir's two rounds)
        fold_constants_ir(model, onnx_shape_inference=True)
        if not rewrite(model).modified:
            break
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


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
