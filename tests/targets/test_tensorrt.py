"""TensorRT: bundles (ONNX + exact trtexec line + manifest), the operator lint, and the real build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from potstill.profiles import load_profile
from potstill.targets import lower
from potstill.targets.tensorrt import tensorrt_status
from potstill.targets.trt_lint import lint_onnx, report_markdown
from torch import nn


def _planted_model() -> onnx.ModelProto:
    """Relu -> Unique (unsupported) -> custom-domain op; plus an asymmetric QuantizeLinear."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu0"),
        helper.make_node("Unique", ["r"], ["u"], name="planted_unique"),
        helper.make_node("FusedGemm", ["u", "u"], ["g"], name="contrib_op", domain="com.microsoft"),
        helper.make_node("QuantizeLinear", ["r", "scale", "zp"], ["q"], name="asym_q"),
        helper.make_node("NonZero", ["r"], ["nz"], name="nonzero0"),
    ]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
             numpy_helper.from_array(np.array(7, np.uint8), "zp")]
    graph = helper.make_graph(
        nodes, "planted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info(n, t, None) for n, t in
         (("g", TensorProto.FLOAT), ("q", TensorProto.UINT8), ("nz", TensorProto.INT64))],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_lint_flags_planted_unsupported_ops() -> None:
    findings = lint_onnx(_planted_model())
    errors = {(f.node, f.op) for f in findings if f.severity == "error"}
    assert ("planted_unique", "Unique") in errors
    assert ("contrib_op", "com.microsoft::FusedGemm") in errors
    assert ("asym_q", "QuantizeLinear") in errors
    assert ("relu0", "Relu") not in {(f.node, f.op) for f in findings}
    nonzero = [f for f in findings if f.op == "NonZero"]
    assert nonzero and nonzero[0].severity == "warning" and "data-dependent" in nonzero[0].message
    assert [f.severity for f in lint_onnx(_planted_model(), dla=True) if f.op == "NonZero"] == ["error"]
    report = report_markdown(findings)
    assert "planted_unique" in report and "| error |" in report


def test_bundle_fp16_fixed_batch(cnn: nn.Module, tmp_path: Path) -> None:
    usable, reason = tensorrt_status()
    if usable:
        pytest.skip(f"TensorRT is usable here ({reason}); the bundle path is for machines without it")
    profile = load_profile("jetson-orin-nano-trt-fp16")
    art = lower(cnn, (torch.randn(1, 3, 16, 16),), profile, tmp_path)
    assert art.target == "tensorrt" and art.precision == "fp16"
    model = onnx.load(str(art.files["onnx"]))
    onnx.checker.check_model(model, full_check=True)
    assert art.parity["ok"] and art.latency_ms == {}
    script = art.files["build"].read_text()
    assert ("trtexec --onnx=model.onnx --saveEngine=model.engine --fp16 --memPoolSize=workspace:1024M "
            "--timingCacheFile=timing.cache --builderOptimizationLevel=3") in script
    assert "--minShapes" not in script  # the profile fixes batch 1: a static engine
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["lint_errors"] == 0 and manifest["trtexec"][0] == "trtexec"
    assert manifest["profile"]["name"] == profile.name and reason in manifest["why_bundle"]
    assert (tmp_path / "README.txt").is_file() and "No findings" in art.files["lint"].read_text()
    assert any("bundle, not an engine" in n for n in art.notes)


def test_bundle_int8_dynamic_batch_with_calibration(cnn: nn.Module, tmp_path: Path) -> None:
    if tensorrt_status()[0]:
        pytest.skip("TensorRT is usable here; the bundle path is for machines without it")
    profile = load_profile("jetson-agx-orin-trt-int8")
    profile = profile.model_copy(update={"tensorrt": profile.tensorrt.model_copy(update={"dla_core": 0})})
    art = lower(cnn, (torch.randn(1, 3, 16, 16),), profile, tmp_path)
    script = art.files["build"].read_text()
    for flag in ("--onnx=model.int8.onnx", "--int8", "--fp16", "--memPoolSize=workspace:4096M",
                 "--minShapes=x:1x3x16x16", "--optShapes=x:4x3x16x16", "--maxShapes=x:8x3x16x16",
                 "--useDLACore=0", "--allowGPUFallback"):
        assert flag in script, flag
    calib = np.load(art.files["calib"])
    assert calib["x"].shape[1:] == (3, 16, 16) and calib["x"].shape[0] >= 1
    qmodel = onnx.load(str(art.files["onnx_int8"]))
    onnx.checker.check_model(qmodel)
    # NNCF's symmetric preset gives zero points TensorRT accepts
    assert not [f for f in lint_onnx(qmodel, dla=False) if f.severity == "error"]


def test_tensorrt_engine_build() -> None:
    usable, reason = tensorrt_status()
    if not usable:
        pytest.skip(f"TensorRT engine build needs TensorRT and a CUDA GPU: {reason}")
    import tempfile

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        art = lower(model, (torch.randn(1, 3, 16, 16),), "h100-trt-fp16", tmp)
        assert art.files["engine"].is_file() and art.parity["ok"]
