"""Targets: lower a student for a device profile into verified engines.

>>> from potstill.targets import lower
>>> art = lower(model, (x,), "cpu", "out/student")   # doctest: +SKIP

``lower`` dispatches to ONNX / ONNX Runtime (FP32, INT8 via NNCF), TensorRT (engine or bundle) and
AOTInductor; every artifact carries parity against PyTorch and measured latency. Heavy libraries
(onnxruntime, NNCF, TensorRT) are imported only when a target needs them.
"""

from .artifact import Artifact
from .lower import TARGETS, lower
from .timing import measure_torch_latency, time_callable

__all__ = ["TARGETS", "Artifact", "lower", "measure_torch_latency", "time_callable"]
