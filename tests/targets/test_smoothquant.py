"""SmoothQuant before dynamic INT8: the rescaled graph computes what the FP32 one does, an outlier
channel's INT8 error falls, and the lowering keeps the smoothed engine only when it measures better."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from potstill.profiles import load_profile
from potstill.targets.int8 import ALPHA_LIMITS, int8_error, quantize_dynamic_onnx, smooth_if_better
from potstill.targets.onnx_export import FlatSpec, OnnxExport
from potstill.targets.onnxruntime import OrtRunner
from potstill.targets.smoothquant import smooth_onnx


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _two_products(path: Path, hidden: int = 64) -> Path:
    """``h = x @ A``, read by ``h @ B`` and ``h @ C`` (one group) and by a residual ``Add`` (which must
    keep reading ``h`` unscaled); the output is the sum of the three."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((hidden, hidden)) * 0.1).astype(np.float32), n)
             for n in ("A", "B", "C")]
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["b"]),
             helper.make_node("MatMul", ["h", "C"], ["c"]), helper.make_node("Add", ["b", "c"], ["bc"]),
             helper.make_node("Add", ["bc", "h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _feeds(outlier: float, seed: int, hidden: int = 64) -> list[dict[str, np.ndarray]]:
    """Four batches of 32 rows whose channel 3 is ``outlier`` times the others."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 32, hidden)).astype(np.float32)
    x[..., 3] *= outlier
    return [{"x": b} for b in x]


def _outlier_graph(tmp_path: Path, hidden: int = 64) -> Path:
    """``h = x @ I`` (identity A), so an outlier channel of ``x`` is one of ``h``, the group's input."""
    path = _two_products(tmp_path / "fp32.onnx", hidden)
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == "A":
            init.CopyFrom(numpy_helper.from_array(np.eye(hidden, dtype=np.float32), "A"))
    onnx.save(model, str(path))
    return path


def _reference(fp32: Path) -> torch.nn.Module:
    """The graph as PyTorch: the reference both engines are judged against."""
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(str(fp32)).graph.initializer}

    class Same(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x @ weights["A"]
            return h @ weights["B"] + h @ weights["C"] + h

    return Same()


def _runner(path: Path) -> OrtRunner:
    return OrtRunner(_session(path), OnnxExport(path, FlatSpec(["x"], 1, []), "", output_name="y"))


def _as_inputs(outlier: float, seed: int) -> list[tuple[tuple[torch.Tensor], dict[str, torch.Tensor]]]:
    return [((torch.from_numpy(f["x"]),), {}) for f in _feeds(outlier, seed)]


def test_smoothing_keeps_the_function_and_lowers_an_outlier_channels_int8_error(tmp_path: Path) -> None:
    fp32 = _outlier_graph(tmp_path)
    calib, judge = _feeds(60.0, seed=1), _feeds(60.0, seed=2)
    report = smooth_onnx(fp32, tmp_path / "smoothed.onnx", calib, _session)
    assert report.groups >= 1 and report.products >= 2 and report.outlier_ratio > 20, report
    smoothed = onnx.load(str(tmp_path / "smoothed.onnx"))
    adds = [n for n in smoothed.graph.node if n.op_type == "Add" and "h" in n.input]
    assert adds, "the residual reader keeps the unscaled tensor"
    plain_fp32, smooth_fp32 = _session(fp32), _session(tmp_path / "smoothed.onnx")
    for feed in judge:  # the same function in FP32
        np.testing.assert_allclose(smooth_fp32.run(None, feed)[0], plain_fp32.run(None, feed)[0], rtol=1e-4, atol=1e-3)

    def error(path: Path) -> float:
        q = _session(quantize_dynamic_onnx(path, path.with_suffix(".int8.onnx")))
        ref = [plain_fp32.run(None, f)[0] for f in judge]
        return sum(float(np.square(q.run(None, f)[0] - r).sum()) for f, r in zip(judge, ref, strict=True)) / \
            sum(float(np.square(r).sum()) for r in ref)

    plain, smooth = error(fp32), error(tmp_path / "smoothed.onnx")
    assert smooth < 0.5 * plain, (plain, smooth)


def test_flat_activations_keep_the_function(tmp_path: Path) -> None:
    """Without outliers both groups (``x`` read by A, ``h`` by B and C) are candidates, and whatever
    the strength search rescales still computes the same function."""
    fp32 = _outlier_graph(tmp_path)
    report = smooth_onnx(fp32, tmp_path / "smoothed.onnx", _feeds(1.0, seed=1), _session)
    assert report.candidates == 2, report
    feed = _feeds(1.0, seed=2)[0]
    np.testing.assert_allclose(_session(tmp_path / "smoothed.onnx").run(None, feed)[0], _session(fp32).run(None, feed)[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("outlier", [60.0, 1.0])
def test_the_lowering_keeps_the_smoothed_engine_only_when_it_measures_better(tmp_path: Path, outlier: float) -> None:
    """``smooth_if_better`` replaces the plain dynamic engine only with one that measures better on the
    judging inputs, and says which it kept with both errors."""
    fp32 = _outlier_graph(tmp_path)
    reference, runner = _reference(fp32), _runner
    judge = _as_inputs(outlier, 2)
    int8 = quantize_dynamic_onnx(fp32, tmp_path / "model.int8.onnx")
    profile = load_profile("cpu")
    plain = int8_error(reference, runner(int8), judge, [])
    note = smooth_if_better(reference, fp32, int8, _feeds(outlier, seed=1), runner, judge, [], profile)
    kept = int8_error(reference, runner(int8), judge, [])
    before, after = plain.value, kept.value
    assert kept.measure == "relative squared error" and kept.rel > 0, kept
    assert (not kept.within(profile.int8), after) <= (not plain.within(profile.int8), before), (plain, kept, note)
    assert "SmoothQuant" in note
    if ": kept (" in note:
        assert after < before and f"{after:.4g}" in note and f"{before:.4g} unsmoothed" in note, note
    else:
        assert after == before and "SmoothQuant not kept" in note, note
    if outlier > 1:
        assert ": kept (" in note and after < 0.5 * before, note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "model.int8.onnx"]  # nothing left behind


@pytest.mark.parametrize("max_rel_error", [1e-9, 10.0])
def test_weaker_strengths_are_tried_only_while_the_engine_is_outside_the_budget(tmp_path: Path,
                                                                                max_rel_error: float) -> None:
    """With a budget no engine meets, every strength limit is tried and the lowest error kept; with
    one the first smoothed engine meets, no weaker one is built."""
    fp32 = _outlier_graph(tmp_path)
    base = load_profile("cpu")
    profile = base.model_copy(update={"int8": base.int8.model_copy(update={"max_rel_error": max_rel_error})})
    judge = _as_inputs(60.0, 2)
    int8 = quantize_dynamic_onnx(fp32, tmp_path / "model.int8.onnx")
    note = smooth_if_better(_reference(fp32), fp32, int8, _feeds(60.0, seed=1), _runner, judge, [], profile)
    tried = note.count("up to alpha")
    assert tried == (len(ALPHA_LIMITS) if max_rel_error < 1 else 1), note
    assert ": kept (" in note, note
    kept = int8_error(_reference(fp32), _runner(int8), judge, []).value
    listed = [float(part.split(": ")[1].split(",")[0]) for part in note.split("; ") if part.startswith("up to alpha")]
    assert f"{kept:.4g}" == f"{min(listed):.4g}", (kept, listed, note)


def test_an_engine_that_gives_nan_never_wins_or_passes(tmp_path: Path) -> None:
    """A NaN anywhere in the engine's output makes its error inf and fails every budget."""
    fp32 = _outlier_graph(tmp_path)
    judge = _as_inputs(60.0, 2)

    def nan_once(item: tuple[tuple[torch.Tensor], dict[str, torch.Tensor]]) -> np.ndarray:
        out = _runner(fp32)(item)
        out[0, 0] = np.nan
        return out

    err = int8_error(_reference(fp32), nan_once, judge, [])
    assert err.value == float("inf") and err.rel == float("inf"), err
    assert not err.within(load_profile("cpu").int8)
    fine = int8_error(_reference(fp32), _runner(fp32), judge, [])
    assert fine.within(load_profile("cpu").int8) and fine.value < 1e-10, fine
