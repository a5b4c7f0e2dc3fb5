"""The ONNX targets: ``onnx`` and ``onnxruntime`` (FP32, or INT8 when the profile asks or tries it).

Both export one checked ``model.onnx`` and measure parity and latency with ONNX Runtime; they
differ in the name recorded and in that ``onnxruntime`` is the profile-tuned engine. INT8 is
``targets.int8`` (NNCF post-training quantisation, kept only where it pays).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from potstill.profiles import DeviceProfile
from torch import nn

from .artifact import Artifact
from .int8 import lower_int8
from .onnxruntime import lower_onnxruntime
from .registry import target


def _lower_ort(
    target_name: str,
    module: nn.Module,
    args: Sequence[Any],
    profile: DeviceProfile,
    out_dir: str | Path,
    kwargs: dict[str, Any],
    dynamic_batch: bool,
    calib: Any,
    hf: dict[str, Any] | None,
) -> Artifact:
    if profile.tries_int8():
        return lower_int8(module, args, profile, out_dir, kwargs=kwargs, dynamic_batch=dynamic_batch, calib=calib, hf=hf)
    return lower_onnxruntime(module, args, profile, out_dir, kwargs=kwargs, dynamic_batch=dynamic_batch, hf=hf,
                             target=target_name)  # fmt: skip


@target("onnx")
def lower_onnx(
    module: nn.Module,
    args: Sequence[Any],
    profile: DeviceProfile,
    out_dir: str | Path,
    *,
    kwargs: dict[str, Any],
    dynamic_batch: bool,
    calib: Any = None,
    hf: dict[str, Any] | None = None,
) -> Artifact:
    """``model.onnx`` (checked), parity and latency through ONNX Runtime."""
    return _lower_ort("onnx", module, args, profile, out_dir, kwargs, dynamic_batch, calib, hf)


@target("onnxruntime")
def lower_ort(
    module: nn.Module,
    args: Sequence[Any],
    profile: DeviceProfile,
    out_dir: str | Path,
    *,
    kwargs: dict[str, Any],
    dynamic_batch: bool,
    calib: Any = None,
    hf: dict[str, Any] | None = None,
) -> Artifact:
    """The same with the profile's ORT settings; INT8 when precision is int8 or ``int8.on_fp32``."""
    return _lower_ort("onnxruntime", module, args, profile, out_dir, kwargs, dynamic_batch, calib, hf)
