"""ONNX and ONNX Runtime lowering: export, session with the profile's settings, parity, latency.

``lower_onnxruntime`` exports the student (Optimum for Hugging Face students where it supports the
architecture, else potstill's own export), opens an ONNX Runtime session with the profile's
threads (intra-op), graph optimisation level and execution provider, checks parity on held-out
inputs (another batch size too when the batch is dynamic) and times the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from potstill.profiles import DeviceProfile
from torch import nn

from .artifact import Artifact
from .large_onnx import external_files, needs_external_data
from .onnx_export import OnnxExport, export_onnx, flat_spec
from .optimum_export import differs_from_saved
from .parity import (
    Inputs,
    batch_size,
    check_parity,
    errors,
    held_out_inputs,
    kept_positions,
    raise_if_failed,
    torch_reference,
    within,
)
from .timing import session_options, time_callable

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}
_NP_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


@dataclass(frozen=True)
class _Tolerance:
    max_abs: float
    rel: float


_SAME_MODEL = _Tolerance(1e-3, 1e-3)


def make_session(path: str | Path, profile: DeviceProfile) -> tuple[Any, list[str]]:
    """An ``InferenceSession`` with the profile's threads, optimisation level and provider."""
    import onnxruntime as ort

    notes: list[str] = []
    opts = session_options(profile.threads, profile.ort.inter_op_threads)
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[profile.ort.graph_optimization])
    provider = profile.ort.execution_provider
    if provider not in ort.get_available_providers():
        notes.append(f"execution provider {provider} is not available here; used CPUExecutionProvider")
        provider = "CPUExecutionProvider"
    return ort.InferenceSession(str(path), opts, providers=[provider]), notes


@dataclass
class OrtRunner:
    """Runs an ONNX Runtime session on (args, kwargs) as the PyTorch module would take them."""

    session: Any
    exported: OnnxExport

    def feeds(self, inputs: Inputs) -> dict[str, np.ndarray]:
        args, kwargs = inputs
        spec = self.exported.spec
        named = dict(zip(spec.names, spec.flatten(args, kwargs)))
        feeds: dict[str, np.ndarray] = {}
        for node in self.session.get_inputs():
            dtype = _NP_TYPES.get(node.type, np.float32)
            if node.name in named:
                feeds[node.name] = named[node.name].detach().cpu().numpy().astype(dtype, copy=False)
            else:  # e.g. token_type_ids that Optimum's graph takes and the caller left out
                like = next(iter(named.values()))
                shape = tuple(like.shape[:2])
                # decoders' position_ids default to 0..n-1 in PyTorch; zeros would be another input
                fill = np.broadcast_to(np.arange(shape[-1]), shape) if node.name == "position_ids" else 0
                feeds[node.name] = np.zeros(shape, dtype=dtype) + np.asarray(fill, dtype=dtype)
        return feeds

    def __call__(self, inputs: Inputs) -> np.ndarray:
        out = self.session.run([self.exported.output_name], self.feeds(inputs))[0]
        return np.asarray(out, dtype=np.float32)


class EngineModule(nn.Module):
    """An ONNX Runtime engine called as the module it was lowered from: ``forward(*args, **kwargs)``
    returns the engine's first output as a tensor (what fidelity measures on an INT8 engine)."""

    def __init__(self, runner: OrtRunner) -> None:
        super().__init__()
        self.runner = runner

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.from_numpy(self.runner((args, kwargs)))


def engine_module(module: nn.Module, onnx_path: str | Path, example: Inputs, profile: DeviceProfile) -> EngineModule:
    """The engine at ``onnx_path`` (lowered from ``module`` on ``example``) as a module."""
    session, _ = make_session(onnx_path, profile)
    spec = flat_spec(module, *example)
    return EngineModule(OrtRunner(session, OnnxExport(Path(onnx_path), spec, "", output_name=session.get_outputs()[0].name)))


def fixed_batch(args: Sequence[Any], kwargs: dict[str, Any], batch: int | None) -> Inputs:
    """The example resized to the profile's fixed batch (repeated or cut), unchanged if None."""
    if batch is None:
        return tuple(args), dict(kwargs)

    def fit(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == batch:
            return x
        reps = -(-batch // x.shape[0])
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch]

    return tuple(fit(a) for a in args), {k: fit(v) for k, v in kwargs.items()}


def export_for_runtime(
    module: nn.Module,
    inputs: Inputs,
    path: Path,
    *,
    dynamic: bool,
    hf: dict[str, Any] | None = None,
) -> OnnxExport:
    """Optimum when ``hf`` names a saved model it supports, else potstill's own export."""
    args, kwargs = inputs
    skip = None
    if hf and needs_external_data(module):
        skip = ("Optimum not used for a model this large (it reloads the saved model and builds the graph in "
                "memory); exported with potstill's exporter, weights as external data")
    elif hf and differs_from_saved(module, hf):
        skip = "Optimum not tried: the module's shapes differ from the saved model's"
    if skip:
        exported = export_onnx(module, args, path, kwargs, dynamic_batch=dynamic)
        exported.notes.insert(0, skip)
        return exported
    if hf:
        try:
            from .optimum_export import optimum_export

            names, primary = optimum_export(hf, path)
            spec = flat_spec(module, args, kwargs)
            note = f"exported with Optimum (task {hf.get('task') or 'feature-extraction'}); inputs {names}"
            exported = OnnxExport(path, spec, "optimum", [note], output_name=primary)
            _same_model(module, exported, inputs)
            return exported
        except Exception as e:  # unsupported architecture, no saved model, or not this module: own export
            fallback = f"Optimum export not used ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
            exported = export_onnx(module, args, path, kwargs, dynamic_batch=dynamic)
            exported.notes.insert(0, fallback + "; exported with potstill's own exporter")
            return exported
    return export_onnx(module, args, path, kwargs, dynamic_batch=dynamic)


def _same_model(module: nn.Module, exported: OnnxExport, inputs: Inputs) -> None:
    """Raise if the ONNX Optimum wrote does not compute ``module`` (e.g. ``hf`` names the teacher
    while ``module`` is a pruned student): the caller then exports the module itself."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    reference = torch_reference(module, inputs)
    max_abs, rel = errors(OrtRunner(session, exported)(inputs), reference, kept_positions(inputs, reference.shape))
    if not within(max_abs, rel, _SAME_MODEL):  # NaN included: a non-finite export is not this module
        raise ValueError(f"the saved model in hf['dir'] is not this module (max_abs {max_abs:.3g})")


def ort_parity_and_latency(
    module: nn.Module,
    path: Path,
    exported: OnnxExport,
    inputs: Inputs,
    profile: DeviceProfile,
    *,
    dynamic: bool,
    tolerance: Any = None,
    budget_s: float = 1.0,
    check: bool = True,
) -> tuple[dict[str, Any], dict[str, float], list[str]]:
    """Parity record, latency record and notes of the engine at ``path``."""
    session, notes = make_session(path, profile)
    runner = OrtRunner(session, exported)
    tolerance = tolerance or profile.tolerance
    other = batch_size(*inputs) + 2 if dynamic else None
    held_out = held_out_inputs(*inputs, other_batch=other)
    parity = check_parity(module, runner, held_out, tolerance, output=exported.output_name)
    if check:
        raise_if_failed(parity, f"ONNX Runtime engine {path}", tolerance)
    feeds = runner.feeds(inputs)
    latency = time_callable(lambda: session.run([exported.output_name], feeds), budget_s=budget_s)
    return parity, latency, notes


def lower_onnxruntime(
    module: nn.Module,
    args: Sequence[Any],
    profile: DeviceProfile,
    out_dir: str | Path,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    hf: dict[str, Any] | None = None,
    target: str = "onnxruntime",
    budget_s: float = 1.0,
) -> Artifact:
    """FP32 ONNX engine for ONNX Runtime, parity-checked against ``module`` and timed."""
    out_dir = Path(out_dir)
    module = module.eval()
    inputs = fixed_batch(args, kwargs or {}, profile.batch)
    dynamic = dynamic_batch and profile.batch is None
    path = out_dir / "model.onnx"
    exported = export_for_runtime(module, inputs, path, dynamic=dynamic, hf=hf)
    parity, latency, notes = ort_parity_and_latency(module, path, exported, inputs, profile, dynamic=dynamic,
                                                    budget_s=budget_s)
    art = Artifact(target=target, precision="fp32", files={"onnx": path, **external_files(path)}, parity=parity,
                   latency_ms=latency)
    art.notes += exported.notes + notes
    art.notes.append(f"exporter: {exported.exporter}; batch {'dynamic' if dynamic else 'fixed'}; "
                     f"ONNX Runtime {profile.ort.graph_optimization} optimisations, "
                     f"{profile.threads or 'all'} threads")
    if profile.precision in ("fp16", "bf16"):
        art.notes.append(f"profile precision {profile.precision} is not run by ONNX Runtime CPU; engine is FP32")
    return art
