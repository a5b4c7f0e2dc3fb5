"""TensorRT: a real engine where TensorRT and a CUDA GPU are present, else a bundle to build on device.

Engine: ONNX parser → ``BuilderConfig`` with the profile's precision (FP16 flag; INT8 from the
explicit Q/DQ model NNCF writes, plus FP16 for the layers left in float), workspace pool limit,
builder optimisation level, timing cache, an optimisation profile over the batch range for dynamic
engines, and a DLA core with GPU fallback where the profile names one. The engine is run on the
held-out inputs through torch CUDA tensors and checked against PyTorch.

Bundle (no TensorRT or no GPU here — and Jetson engines are built on the Jetson anyway):
``model.onnx`` (checked, parity-checked in ONNX Runtime), ``model.int8.onnx`` (Q/DQ) for INT8
profiles, calibration inputs ``calib/calib.npz``, ``build.sh`` with the exact ``trtexec`` line,
``lint.md``/``lint.json`` (``trt_lint``), ``manifest.json`` and ``README.txt``.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from potstill.errors import PotstillError
from potstill.outputs.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from potstill.profiles import DeviceProfile
from torch import nn

from .artifact import Artifact
from .large_onnx import external_files
from .onnxruntime import OrtRunner, export_for_runtime, fixed_batch, make_session, ort_parity_and_latency
from .parity import Inputs, batch_size, check_parity, held_out_inputs, raise_if_failed
from .registry import target
from .trt_lint import findings_to_json, lint_onnx, report_markdown

ENGINE_NAME = "model.engine"


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): TensorRT's builder imports and a CUDA GPU is visible."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return False, f"the tensorrt Python package is not installed ({e})"
    if not hasattr(trt, "Builder"):
        return False, "tensorrt is a runtime-only (lean) install without the builder"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch"
    return True, f"TensorRT {trt.__version__} with CUDA"


def input_shapes(onnx_path: Path, example: dict[str, tuple[int, ...]]) -> list[tuple[str, list[int | None]]]:
    """Graph inputs with their static dims (None where the dim is symbolic)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        out.append((v.name, dims))
    return out


def shape_range(
    shapes: list[tuple[str, list[int | None]]],
    example: dict[str, tuple[int, ...]],
    profile: DeviceProfile,
    max_positions: int | None = None,
) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """(min, opt, max) per dynamic input: the batch dim over the profile's batch range, the token dim
    of text inputs over its sequence range (opt: the example's length, i.e. the timing shape, unless
    ``opt_sequence`` is set; max capped by the model's ``max_positions``), others as the example."""
    from .onnx_export import TEXT_INPUTS

    t = profile.tensorrt
    ranges = {}
    for name, dims in shapes:
        if all(d is not None for d in dims):
            continue
        ex = list(example.get(name, [1] * len(dims)))
        lo, opt, hi = ([d if d is not None else ex[i] for i, d in enumerate(dims)] for _ in range(3))
        if dims and dims[0] is None:
            lo[0], opt[0], hi[0] = t.min_batch, t.opt_batch, t.max_batch
        if name in TEXT_INPUTS and len(dims) == 2 and dims[1] is None:
            top = min(t.max_sequence, max_positions) if max_positions else t.max_sequence
            mid = t.opt_sequence if t.opt_sequence is not None else ex[1]
            lo[1], hi[1] = min(t.min_sequence, mid), max(top, mid)
            opt[1] = mid
        ranges[name] = (lo, opt, hi)
    return ranges


def trtexec_command(profile: DeviceProfile, onnx_name: str,
                    ranges: dict[str, tuple[list[int], list[int], list[int]]]) -> list[str]:
    """The ``trtexec`` argument list that builds this profile's engine from ``onnx_name``."""
    t = profile.tensorrt
    cmd = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={ENGINE_NAME}"]
    if profile.precision == "fp16":
        cmd.append("--fp16")
    elif profile.precision == "bf16":
        cmd.append("--bf16")
    elif profile.precision == "int8":
        cmd += ["--int8", "--fp16"]
    cmd.append(f"--memPoolSize=workspace:{t.workspace_mb}M")
    if ranges:
        for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            spec = ",".join(f"{n}:{'x'.join(map(str, r[k]))}" for n, r in ranges.items())
            cmd.append(f"{flag}={spec}")
    if t.timing_cache:
        cmd.append(f"--timingCacheFile={t.timing_cache}")
    cmd.append(f"--builderOptimizationLevel={t.builder_optimization_level}")
    if t.dla_core is not None:
        cmd += [f"--useDLACore={t.dla_core}", "--allowGPUFallback"]
    return cmd


def _int8_model(onnx_path: Path, exported: Any, example: Inputs, profile: DeviceProfile, *,
                calib: Any, out_dir: Path, transformer: bool) -> tuple[Path | None, list[Inputs], list[str]]:
    """Q/DQ INT8 ONNX (symmetric, as TensorRT needs) and the calibration inputs used."""
    from .int8 import calibration_inputs, quantize_onnx

    samples, note = calibration_inputs(calib, example, profile.int8.calibration_samples)
    session, _ = make_session(onnx_path, profile)
    feeds = [OrtRunner(session, exported).feeds(s) for s in samples]
    try:
        path = quantize_onnx(onnx_path, out_dir / "model.int8.onnx", feeds, profile.int8.calibration_samples,
                             transformer=transformer)
    except Exception as e:  # NNCF missing or failed: ship FP32 ONNX and the calibration data
        return None, samples, [f"NNCF Q/DQ export failed ({type(e).__name__}: {e}); {note}"]
    return path, samples, [f"INT8 as explicit Q/DQ (NNCF, symmetric): {note}"]


@target("tensorrt", devices=("cuda",), subdir="tensorrt")
def lower_tensorrt(
    module: nn.Module,
    args: Sequence[Any],
    profile: DeviceProfile,
    out_dir: str | Path,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    calib: Any = None,
    hf: dict[str, Any] | None = None,
) -> Artifact:
    """A TensorRT engine (when possible here) or a bundle; the ONNX is always checked and linted."""
    out_dir = Path(out_dir)
    module = module.eval()
    example = fixed_batch(args, kwargs or {}, profile.batch)
    dynamic = dynamic_batch and profile.batch is None
    onnx_path = out_dir / "model.onnx"
    exported = export_for_runtime(module, example, onnx_path, dynamic=dynamic, hf=hf)
    parity, _, notes = ort_parity_and_latency(module, onnx_path, exported, example, profile, dynamic=dynamic,
                                              budget_s=0.2)
    notes = exported.notes + notes
    files: dict[str, Path] = {"onnx": onnx_path, **external_files(onnx_path)}  # trtexec reads <name>.data beside it
    engine_onnx = onnx_path
    if profile.precision == "int8":
        q_path, samples, int8_notes = _int8_model(onnx_path, exported, example, profile, calib=calib,
                                                  out_dir=out_dir, transformer=bool(kwargs) or bool(hf))
        notes += int8_notes
        files["calib"] = _save_calibration(out_dir / "calib" / "calib.npz", samples, exported)
        if q_path is not None:
            files["onnx_int8"] = engine_onnx = q_path
    findings = lint_onnx(engine_onnx, dla=profile.tensorrt.dla_core is not None)
    files["lint"] = atomic_write_text(out_dir / "lint.md", report_markdown(findings, engine_onnx.name))
    atomic_write_json(out_dir / "lint.json", findings_to_json(findings))
    n_err = sum(f.severity == "error" for f in findings)
    if n_err:
        notes.append(f"TensorRT lint: {n_err} error(s) — see lint.md: "
                     + "; ".join(f.text() for f in findings if f.severity == "error")[:400])
    example_shapes = {n: tuple(t.shape) for n, t in zip(exported.spec.names, exported.spec.flatten(*example))}
    from .onnx_export import max_sequence

    ranges = shape_range(input_shapes(engine_onnx, example_shapes), example_shapes, profile,
                         max_positions=max_sequence(module))
    cmd = trtexec_command(profile, engine_onnx.name, ranges)
    usable, reason = tensorrt_status()
    if usable and not n_err:
        engine, latency, parity = build_and_check(module, engine_onnx, out_dir, profile, ranges=ranges,
                                                  example=example, exported=exported)
        files["engine"] = engine
        notes.append(f"built with the TensorRT Python API ({reason}); equivalent: {shlex.join(cmd)}")
        return Artifact("tensorrt", profile.precision, files, parity, latency, notes)
    files["build"] = _write_bundle(out_dir, profile, cmd, files=files, findings=findings, parity=parity,
                                   reason=reason)
    notes.append(f"bundle, not an engine: {reason}. Build on the device with build.sh: {shlex.join(cmd)}")
    notes.append("parity is the ONNX's in ONNX Runtime; the engine's parity is checked on the device")
    return Artifact("tensorrt", profile.precision, files, parity, {}, notes)


def _save_calibration(path: Path, samples: list[Inputs], exported: Any) -> Path:
    spec = exported.spec
    stacked: dict[str, np.ndarray] = {}
    for name in spec.names:
        parts = [dict(zip(spec.names, spec.flatten(*s)))[name].detach().cpu().numpy() for s in samples]
        stacked[name] = np.concatenate(parts, axis=0)
    import io

    buf = io.BytesIO()
    np.savez(buf, **stacked)  # type: ignore[arg-type]
    return atomic_write_bytes(path, buf.getvalue())


def _write_bundle(out_dir: Path, profile: DeviceProfile, cmd: list[str], *, files: dict[str, Path],
                  findings: list[Any], parity: dict[str, Any], reason: str) -> Path:
    script = (f"#!/bin/sh\n# Build the TensorRT engine for profile '{profile.name}' on the device.\nset -e\n"
              f'cd "$(dirname "$0")"\n{shlex.join(cmd)}\n')
    build = atomic_write_text(out_dir / "build.sh", script)
    build.chmod(0o755)
    atomic_write_text(out_dir / "README.txt", (
        f"TensorRT bundle for profile '{profile.name}' ({profile.precision}). Built here as a bundle because "
        f"{reason}.\nOn the device, run: sh build.sh  (it runs: {shlex.join(cmd)})\n"
        "lint.md lists ONNX constructs TensorRT 10 rejects or handles specially.\n"))
    atomic_write_json(out_dir / "manifest.json", {
        "profile": profile.to_dict(), "trtexec": cmd, "files": {k: v.name for k, v in files.items()},
        "engine": ENGINE_NAME, "onnx_parity": parity, "lint_errors": sum(f.severity == "error" for f in findings),
        "lint_warnings": sum(f.severity == "warning" for f in findings), "why_bundle": reason,
    })
    return build


def build_engine(onnx_path: Path, out_path: Path, profile: DeviceProfile,
                 ranges: dict[str, tuple[list[int], list[int], list[int]]]) -> Path:
    """Build and serialise a TensorRT engine with the real builder API."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PotstillError(f"{onnx_path}: TensorRT's ONNX parser failed: {errs}")
    t = profile.tensorrt
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, t.workspace_mb << 20)
    config.builder_optimization_level = t.builder_optimization_level
    if profile.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if profile.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if profile.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if t.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = t.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache_path = out_path.parent / t.timing_cache if t.timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if ranges:
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in ranges.items():
            opt.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PotstillError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return atomic_write_bytes(out_path, bytes(serialized))


class TensorRTRunner:
    """Runs a deserialised engine on torch CUDA tensors (``execute_async_v3``)."""

    def __init__(self, engine_path: Path, exported: Any) -> None:
        import tensorrt as trt

        self.trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        self.exported = exported

    def __call__(self, inputs: Inputs) -> np.ndarray:
        trt = self.trt
        named = dict(zip(self.exported.spec.names, self.exported.spec.flatten(*inputs)))
        keep = []
        out_name = self.exported.output_name
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                dtype = torch.from_numpy(np.zeros(1, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
                t = named[name].to("cuda", dtype).contiguous()
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
                keep.append(t)
        outputs = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                dtype = torch.from_numpy(np.zeros(1, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
                buf = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
                self.context.set_tensor_address(name, buf.data_ptr())
                outputs[name] = buf
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return outputs.get(out_name, next(iter(outputs.values()))).float().cpu().numpy()


def build_and_check(module: nn.Module, onnx_path: Path, out_dir: Path, profile: DeviceProfile, *,
                    ranges: dict[str, tuple[list[int], list[int], list[int]]], example: Inputs,
                    exported: Any) -> tuple[Path, dict[str, float], dict[str, Any]]:
    from .timing import time_callable

    engine = build_engine(onnx_path, out_dir / ENGINE_NAME, profile, ranges)
    runner = TensorRTRunner(engine, exported)
    dynamic = bool(ranges)
    other = min(batch_size(*example) + 2, profile.tensorrt.max_batch) if dynamic else None
    parity = check_parity(module, runner, held_out_inputs(*example, other_batch=other), profile.tolerance)
    raise_if_failed(parity, engine, profile.tolerance)
    latency = time_callable(lambda: runner(example))
    return engine, latency, parity
