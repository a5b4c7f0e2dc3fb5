"""``lower()``: one entry point for every target (the ``lower.*`` passes are in ``targets.lowering``).

``lower(module, example_inputs, profile, out_dir, target=None, ...)`` lowers a student for a
profile (target defaults to the profile's) and returns an ``Artifact``: engine files, parity
against PyTorch on held-out inputs and measured latency. A parity failure raises ``ParityError``.

The targets are those registered with ``@target`` (``targets.registry``); the built-ins:

=============  ==============================================================================
target         what is produced
=============  ==============================================================================
onnx           ``model.onnx`` (checked), parity and latency through ONNX Runtime
onnxruntime    the same, with the profile's ORT settings; INT8 via NNCF when precision is int8
tensorrt       a TensorRT engine where TensorRT and CUDA are present, else a build bundle
aoti           ``model.pt2`` (AOTInductor), loaded and checked in a child process
=============  ==============================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from potstill.profiles import DeviceProfile, load_profile
from torch import nn

from .artifact import Artifact
from .registry import get_target


def lower(
    module: nn.Module,
    example_inputs: Sequence[Any],
    profile: DeviceProfile | str,
    out_dir: str | Path,
    *,
    target: str | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    calib: Any = None,
    hf: dict[str, Any] | None = None,
) -> Artifact:
    """Lower ``module`` for ``profile`` into ``out_dir``; see the module docstring.

    >>> art = lower(model, (torch.randn(1, 3, 32, 32),), "cpu", "out/student")  # doctest: +SKIP
    >>> art.parity["ok"], art.latency_ms["median"]                               # doctest: +SKIP
    """
    profile = load_profile(profile)
    spec = get_target(target or profile.target)
    optional = {"calib": calib, "hf": hf}
    extra = {name: optional[name] for name in spec.takes()}
    return spec.lower(module, tuple(example_inputs), profile, out_dir, kwargs=dict(example_kwargs or {}),
                      dynamic_batch=dynamic_batch, **extra)  # fmt: skip
