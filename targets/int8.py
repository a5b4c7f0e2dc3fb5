"""Post-training INT8 through NNCF on the ONNX model, kept only when it pays and stays accurate.

``nncf.quantize`` inserts QuantizeLinear/DequantizeLinear pairs calibrated on ``nncf.Dataset``
feeds (the calibration batches, or random inputs in the example's range when none are given).
The INT8 engine is kept only if it is faster than FP32 by the profile's ``int8.min_speedup`` *and*
within its budget: ``rel = max|int8 − torch| / max|torch| <= int8.max_rel_error`` and, for
classifier-shaped outputs ``[batch, classes]``, top-1 disagreement with PyTorch on held-out inputs
``<= int8.max_accuracy_drop`` (a bound on the accuracy drop), measured on the example plus the
calibration batches when there are any (the data distribution INT8 was calibrated for), else on
random look-alikes of the example. Otherwise FP32 is kept. Either way
the notes record the decision and both latencies: INT8 is measured per model, never assumed
(a ResNet-18 ran 2.5× faster in INT8 here, EfficientNet-Lite0 slower).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from potstill.inputs.data import iter_batches
from potstill.outputs.atomic import atomic_path
from potstill.profiles import DeviceProfile, Tolerance
from torch import nn

from .artifact import Artifact
from .onnx_export import OnnxExport, flat_spec
from .onnxruntime import OrtRunner, fixed_batch, lower_onnxruntime, make_session
from .parity import Inputs, check_parity, held_out_inputs, torch_reference
from .timing import time_callable


def calibration_inputs(
    calib: Callable[[], Iterable[Any]] | Iterable[Any] | None,
    example: Inputs,
    samples: int,
) -> tuple[list[Inputs], str]:
    """Calibration (args, kwargs) pairs, at most ``samples`` examples, and where they came from."""
    if calib is not None:
        out: list[Inputs] = []
        seen = 0
        for batch in iter_batches(calib):
            out.append((tuple(batch.args), dict(batch.kwargs)))
            seen += batch.size
            if seen >= samples:
                break
        if out:
            return out, f"{seen} calibration samples from the calibration data"
    n = max(1, min(samples, 32))
    randoms = held_out_inputs(*example, n_random=n, seed=1234)[1:]
    return randoms, f"no calibration data: {n} random inputs in the example's value range"


def quantize_onnx(fp32_path: Path, out_path: Path, feeds: Sequence[dict[str, np.ndarray]],
                  samples: int, *, transformer: bool = False) -> Path:
    """NNCF post-training INT8 of the ONNX model at ``fp32_path``; written atomically to ``out_path``."""
    import nncf
    import onnx

    nncf.set_log_level(logging.ERROR)
    model = onnx.load(str(fp32_path))
    extra: dict[str, Any] = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(
            model, nncf.Dataset(list(feeds)), subset_size=max(1, min(samples, len(feeds) * 64)),
            preset=nncf.QuantizationPreset.PERFORMANCE, **extra,
        )
    with atomic_path(out_path) as tmp:
        onnx.save(quantized, str(tmp))
    return out_path


def top1_disagreement(module: nn.Module, runner: OrtRunner, inputs: Sequence[Inputs]) -> float | None:
    """Fraction of samples whose argmax differs from PyTorch's; None for non-classifier outputs."""
    differ, total = 0, 0
    for item in inputs:
        ref = torch_reference(module, item)
        if ref.ndim != 2 or ref.shape[1] < 2:
            return None
        got = runner(item)
        differ += int(np.sum(np.argmax(got, axis=1) != np.argmax(ref, axis=1)))
        total += ref.shape[0]
    return differ / total if total else None


@dataclass
class Int8Decision:
    keep: bool
    reasons: list[str]
    fp32_ms: float
    int8_ms: float
    rel: float
    disagreement: float | None


def decide(profile: DeviceProfile, fp32_ms: float, int8_ms: float, rel: float,
           disagreement: float | None) -> Int8Decision:
    """Apply the profile's INT8 budget; ``reasons`` lists every failed condition."""
    opts = profile.int8
    reasons = []
    speedup = fp32_ms / int8_ms if int8_ms > 0 else 0.0
    if opts.require_speedup and (int8_ms >= fp32_ms or speedup < opts.min_speedup):
        reasons.append(f"not faster enough: speed-up {speedup:.2f}x < required {opts.min_speedup:g}x")
    if rel > opts.max_rel_error:
        reasons.append(f"parity: rel {rel:.3g} > int8.max_rel_error {opts.max_rel_error:g}")
    if disagreement is not None and disagreement > opts.max_accuracy_drop:
        reasons.append(f"top-1 disagreement {disagreement:.3f} > int8.max_accuracy_drop {opts.max_accuracy_drop:g}")
    return Int8Decision(not reasons, reasons, fp32_ms, int8_ms, rel, disagreement)


def lower_int8(
    module: nn.Module,
    args: Sequence[Any],
    profile: DeviceProfile,
    out_dir: str | Path,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    calib: Any = None,
    hf: dict[str, Any] | None = None,
    budget_s: float = 1.0,
) -> Artifact:
    """FP32 engine, then NNCF INT8; returns the INT8 artifact if it is kept, else the FP32 one."""
    out_dir = Path(out_dir)
    fp32 = lower_onnxruntime(module, args, profile, out_dir, kwargs=kwargs, dynamic_batch=dynamic_batch, hf=hf,
                             budget_s=budget_s)
    example = fixed_batch(args, kwargs or {}, profile.batch)
    calib_inputs, calib_note = calibration_inputs(calib, example, profile.int8.calibration_samples)
    session, _ = make_session(fp32.files["onnx"], profile)
    exported = OnnxExport(fp32.files["onnx"], flat_spec(module, *example), "",
                          output_name=session.get_outputs()[0].name)
    feeds = [OrtRunner(session, exported).feeds(item) for item in calib_inputs]
    int8_path = quantize_onnx(fp32.files["onnx"], out_dir / "model.int8.onnx", feeds,
                              profile.int8.calibration_samples, transformer=bool(kwargs) or bool(hf))
    int8_session, _ = make_session(int8_path, profile)
    runner = OrtRunner(int8_session, OnnxExport(int8_path, exported.spec, "nncf", output_name=exported.output_name))
    # judge INT8 on the data distribution it will see: the example plus the calibration batches when
    # there are real ones (random look-alikes, e.g. random token ids, exaggerate INT8 error), else random
    held_out = [example, *calib_inputs[:8]] if calib is not None else held_out_inputs(*example, n_random=6, seed=7)
    # INT8 is judged on rel alone: the largest finite bound stands for "no bound on max_abs"
    budget = Tolerance(max_abs=sys.float_info.max, rel=profile.int8.max_rel_error)
    parity = check_parity(module, runner, held_out, budget)
    parity["ok"] = parity["rel"] <= profile.int8.max_rel_error
    disagreement = top1_disagreement(module, runner, held_out)
    int8_feeds = runner.feeds(example)
    latency = time_callable(lambda: int8_session.run([exported.output_name], int8_feeds), budget_s=budget_s)
    d = decide(profile, fp32.latency_ms["median"], latency["median"], parity["rel"], disagreement)
    summary = (f"INT8 (NNCF) {d.int8_ms:.3f} ms vs FP32 {d.fp32_ms:.3f} ms "
               f"(speed-up {d.fp32_ms / d.int8_ms:.2f}x), rel {d.rel:.3g}"
               + (f", top-1 disagreement {d.disagreement:.3f}" if d.disagreement is not None else "")
               + f"; {calib_note}")
    if d.keep:
        art = Artifact("onnxruntime", "int8", {"onnx": int8_path, "onnx_fp32": fp32.files["onnx"]},
                       parity, latency, [*fp32.notes, f"kept INT8: {summary}"])
        art.parity["fp32"] = dict(fp32.parity)
        art.latency_ms["fp32_median"] = fp32.latency_ms["median"]
        return art
    int8_path.unlink(missing_ok=True)
    fp32.notes.append(f"kept FP32, INT8 rejected ({'; '.join(d.reasons)}): {summary}")
    fp32.parity["int8"] = dict(parity)
    fp32.latency_ms["int8_median"] = latency["median"]
    return fp32
