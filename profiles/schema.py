"""The versioned device-profile schema (pydantic v2).

A ``DeviceProfile`` says what a device runs and what a student must meet there: the runtime
(``target``), precision, threads, batch, budgets, the parity tolerance an engine must meet against
PyTorch, the channel multiple the hardware runs fast, roofline figures from the device's datasheet
and an optional measured ``LatencyTable``. Unknown fields are errors; so is a ``version`` newer than
``PROFILE_VERSION``. Tolerance: ``max_abs`` bounds ``max|engine − torch|``; ``rel`` bounds
``max|engine − torch| / max|torch|`` (the error against the output's scale); an engine passes when
either bound holds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .table import LatencyTable

#: the schema version this code reads and writes
PROFILE_VERSION = 1

#: a registered target's name (``potstill.targets.registry``; a plugin's included)
Target = str
Precision = Literal["fp32", "fp16", "bf16", "int8"]
Device = Literal["cpu", "cuda"]


class _Strict(BaseModel):
    # allow_inf_nan=False: a tolerance or budget of .inf or .nan would switch its check off
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Tolerance(_Strict):
    """Parity bounds of an engine against the PyTorch module (see the module docstring)."""

    max_abs: float = Field(default=1e-4, gt=0, description="bound on max|engine - torch|")
    rel: float = Field(default=1e-4, gt=0, description="bound on max|engine - torch| / max|torch|")


class Roofline(_Strict):
    """Datasheet figures: peak FLOP/s per precision, memory bandwidth (GB/s), memory size (GB)."""

    peak_flops: dict[Precision, float] = Field(default_factory=dict)
    memory_bandwidth_gbs: float = Field(gt=0)
    memory_gb: float = Field(gt=0)

    @field_validator("peak_flops")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        for k, flops in v.items():
            if flops <= 0:
                raise ValueError(f"peak_flops.{k} must be > 0 FLOP/s, got {flops}")
        return v


class OrtOptions(_Strict):
    """ONNX Runtime session settings."""

    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    execution_provider: str = "CPUExecutionProvider"
    inter_op_threads: int | None = Field(default=None, ge=1)


class TensorRTOptions(_Strict):
    """TensorRT builder settings; batch range for the optimisation profile of dynamic engines."""

    workspace_mb: int = Field(default=1024, ge=1)
    dla_core: int | None = Field(default=None, ge=0)
    timing_cache: str | None = "timing.cache"
    builder_optimization_level: int = Field(default=3, ge=0, le=5)
    min_batch: int = Field(default=1, ge=1)
    opt_batch: int = Field(default=1, ge=1)
    max_batch: int = Field(default=8, ge=1)
    #: token range of text engines; opt_sequence None = the timing shape (--sequence-length);
    #: max_sequence is also capped by the model's max_position_embeddings
    min_sequence: int = Field(default=1, ge=1)
    opt_sequence: int | None = Field(default=None, ge=1)
    max_sequence: int = Field(default=512, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> TensorRTOptions:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, "
                f"{self.max_batch}"
            )
        opt = self.opt_sequence if self.opt_sequence is not None else self.min_sequence
        if not self.min_sequence <= opt <= self.max_sequence:
            raise ValueError(
                f"need min_sequence <= opt_sequence <= max_sequence, got {self.min_sequence}, "
                f"{self.opt_sequence}, {self.max_sequence}"
            )
        return self


class Int8Options(_Strict):
    """Post-training INT8: calibration size and the budget an INT8 engine must meet to be kept."""

    calibration_samples: int = Field(default=128, ge=1)
    #: INT8 engine vs PyTorch: max|a-b| / max|b| must not exceed this
    max_rel_error: float = Field(default=0.1, gt=0)
    #: top-1 disagreement with PyTorch on held-out inputs (a bound on the accuracy drop)
    max_accuracy_drop: float = Field(default=0.05, ge=0, le=1)
    #: a causal language model with real calibration text is judged by this instead of the two
    #: above: the INT8 engine's perplexity of the calibration text's next tokens over PyTorch's.
    #: Logits at every position are a harsher gate than the text asks: on SmolLM2-135M, 8-bit
    #: weights moved the largest logit by 0.21 of its size and perplexity by 3.5 %
    max_perplexity_ratio: float = Field(default=1.05, ge=1)
    #: keep INT8 only when it is faster than FP32 by at least ``min_speedup``
    require_speedup: bool = True
    min_speedup: float = Field(default=1.0, gt=0)
    #: how activations are quantised: ``static`` (NNCF, calibrated scales, Q/DQ around every op),
    #: ``dynamic`` (ONNX Runtime: per-channel INT8 weights, activation scales computed per batch at
    #: run time, for MatMul/Gemm), ``weight-only`` (ONNX Runtime's MatMulNBits: 8-bit weights in
    #: blocks of 128 along the input, activations quantised per block at run time), or ``auto``:
    #: dynamic for graphs of matrix products (transformers), then weight-only where dynamic misses
    #: the fidelity budget, static for convolutional ones
    mode: Literal["auto", "static", "dynamic", "weight-only"] = "auto"
    #: on a profile of another precision (``fp32``), try INT8 for every student as well and keep it
    #: where it pays, by the same checks (the teacher's reference engine stays unquantised)
    on_fp32: bool = False
    #: INT8 is tried only for models of at least this many multiply-accumulates on the example
    #: input: below it, quantise/dequantise overhead outweighs the integer products (0: always try)
    min_macs: float = Field(default=0, ge=0)


class DeviceProfile(_Strict):
    """A device: what it runs, its budgets and figures. Build with ``load_profile``."""

    version: int = PROFILE_VERSION
    name: str = Field(min_length=1)
    description: str = ""
    target: Target = "onnxruntime"
    precision: Precision = "fp32"
    device: Device = "cpu"
    threads: int | None = Field(default=None, ge=1)
    #: fixed batch size of engines; None = dynamic batch
    batch: int | None = Field(default=None, ge=1)
    input_shapes: list[list[int]] | None = None
    #: token count of text teachers' example inputs: the timing shape (--sequence-length overrides)
    sequence_length: int | None = Field(default=None, ge=1, le=65536)
    latency_budget_ms: float | None = Field(default=None, gt=0)
    memory_budget_mb: float | None = Field(default=None, gt=0)
    #: fidelity floor: a student whose fidelity score to the teacher is below it is flagged (None: the default)
    min_fidelity: float | None = Field(default=None, ge=0, le=1)
    tolerance: Tolerance = Field(default_factory=lambda: Tolerance())  # noqa: PLW0108
    channel_multiple: int = Field(default=1, ge=1)
    roofline: Roofline | None = None
    latency_table: LatencyTable | None = None
    ort: OrtOptions = Field(default_factory=lambda: OrtOptions())  # noqa: PLW0108
    tensorrt: TensorRTOptions = Field(default_factory=lambda: TensorRTOptions())  # noqa: PLW0108
    int8: Int8Options = Field(default_factory=lambda: Int8Options())  # noqa: PLW0108

    @field_validator("version")
    @classmethod
    def _supported_version(cls, v: int) -> int:
        if v > PROFILE_VERSION:
            raise ValueError(
                f"profile version {v} is newer than this potstill supports ({PROFILE_VERSION}); "
                "upgrade potstill or write the profile for version 1"
            )
        if v < 1:
            raise ValueError(f"version must be >= 1, got {v}")
        return v

    @field_validator("target")
    @classmethod
    def _known_target(cls, v: str) -> str:
        from potstill.targets.registry import target_names  # imported here: the targets read profiles

        if v not in target_names():
            raise ValueError(f"unknown target {v!r}; expected one of {', '.join(map(repr, target_names()))}")
        return v

    @field_validator("input_shapes")
    @classmethod
    def _shapes(cls, v: list[list[int]] | None) -> list[list[int]] | None:
        for shape in v or []:
            if not shape or any(d < 1 for d in shape):
                raise ValueError(f"each input shape needs dims >= 1, got {shape}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        from potstill.targets.registry import get_target

        devices = get_target(self.target).devices
        if devices is not None and self.device not in devices:
            raise ValueError(f"target '{self.target}' runs on device {' or '.join(map(repr, devices))}; "
                             f"set device: {devices[0]}")  # fmt: skip
        if self.tensorrt.dla_core is not None and self.precision not in ("fp16", "int8"):
            raise ValueError("a DLA core runs fp16 or int8 only; set precision to fp16 or int8")
        return self

    def tries_int8(self) -> bool:
        """Whether students are quantised: precision int8, or fp32 with ``int8.on_fp32``."""
        return self.precision == "int8" or (self.int8.on_fp32 and self.precision == "fp32")

    def unquantised(self) -> DeviceProfile:
        """This profile without INT8 (``precision: int8`` read as fp32, ``int8.on_fp32`` off): what
        the teacher's reference engine is lowered with, so students' speed-ups include what INT8 buys."""
        if self.precision != "int8" and not self.int8.on_fp32:
            return self
        return self.model_copy(update={"precision": "fp32" if self.precision == "int8" else self.precision,
                                       "int8": self.int8.model_copy(update={"on_fp32": False})})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON ready); ``DeviceProfile.model_validate`` reads it back."""
        return self.model_dump(mode="json", exclude_none=True)

    def peak_flops(self) -> float | None:
        """Datasheet peak FLOP/s at this profile's precision (fp32 if that precision is not listed)."""
        if self.roofline is None:
            return None
        flops = self.roofline.peak_flops
        return flops.get(self.precision) or flops.get("fp32")
