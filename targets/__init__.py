"""Targets: lower a student for a device profile into verified engines.

>>> from potstill.targets import lower
>>> art = lower(model, (x,), "cpu", "out/student")   # doctest: +SKIP

``lower`` dispatches to the backend registered under the target's name (``@target``,
``targets.registry``): ONNX / ONNX Runtime (FP32, INT8 via NNCF), TensorRT (engine or bundle),
AOTInductor, and any plugin's. Every artifact carries parity against PyTorch and measured latency.
Heavy libraries (onnxruntime, NNCF, TensorRT) are imported only when a target needs them.
"""

from .artifact import Artifact
from .lower import lower
from .registry import TargetSpec, get_target, target, target_names
from .timing import measure_torch_latency, time_callable

__all__ = ["Artifact", "TargetSpec", "get_target", "lower", "measure_torch_latency", "target", "target_names",
           "time_callable"]
