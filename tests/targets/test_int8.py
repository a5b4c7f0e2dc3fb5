"""NNCF INT8: kept only when faster and within the parity/accuracy budget — enforced both ways."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from potstill.profiles import DeviceProfile, load_profile
from potstill.targets import lower
from potstill.targets.int8 import decide
from torch import nn


def _conv_net() -> nn.Module:
    """Conv-heavy (64 channels at 32x32): INT8 with VNNI runs it ~3x faster than FP32 here."""
    torch.manual_seed(0)

    def block(c: int) -> list[nn.Module]:
        return [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]

    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), *block(64), *block(64), *block(64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def _int8_profile(**int8: object) -> DeviceProfile:
    base = load_profile("cpu")
    return base.model_copy(update={"precision": "int8", "threads": 1,
                                   "int8": base.int8.model_copy(update=int8)})


def _calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(4)]


def test_int8_kept_when_within_parity_and_accuracy_budgets(tmp_path: Path) -> None:
    model = _conv_net()
    with torch.no_grad():  # wide logit margins, so top-1 agreement is a real gate on a random net
        model[-1].weight.mul_(50.0)
    # speed is the decision rule's business (test_decision_rule_both_ways); a test never asserts a timing
    art = lower(model, (torch.randn(1, 3, 32, 32),),
                _int8_profile(max_rel_error=0.1, max_accuracy_drop=0.25, require_speedup=False),
                tmp_path, calib=_calib)
    assert art.precision == "int8", art.notes
    qmodel = onnx.load(str(art.files["onnx"]))
    assert any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)
    assert art.files["onnx_fp32"].is_file()
    assert art.parity["ok"] and art.parity["rel"] <= 0.1
    note = next(n for n in art.notes if n.startswith("kept INT8"))
    assert "FP32" in note and "speed-up" in note and "calibration samples from the calibration data" in note


def test_int8_rejected_over_parity_budget(tmp_path: Path) -> None:
    model = _conv_net()
    art = lower(model, (torch.randn(1, 3, 32, 32),), _int8_profile(max_rel_error=1e-7), tmp_path)
    assert art.precision == "fp32"
    assert not (tmp_path / "model.int8.onnx").exists()
    note = next(n for n in art.notes if n.startswith("kept FP32"))
    assert "INT8 rejected" in note and "parity: rel" in note and "vs FP32" in note
    assert art.parity["ok"] and art.parity["int8"]["rel"] > 1e-7
    assert art.latency_ms["int8_median"] > 0


def test_decision_rule_both_ways() -> None:
    profile = _int8_profile(max_rel_error=0.05, max_accuracy_drop=0.01, min_speedup=1.2)
    assert decide(profile, fp32_ms=3.0, int8_ms=1.0, rel=0.01, disagreement=0.0).keep
    slow = decide(profile, fp32_ms=3.0, int8_ms=2.8, rel=0.01, disagreement=0.0)
    assert not slow.keep and "speed-up" in slow.reasons[0]
    wrong = decide(profile, fp32_ms=3.0, int8_ms=1.0, rel=0.01, disagreement=0.2)
    assert not wrong.keep and "disagreement" in wrong.reasons[0]
    loose = _int8_profile(require_speedup=False)
    assert decide(loose, fp32_ms=1.0, int8_ms=2.0, rel=0.01, disagreement=None).keep


def test_quantize_pass_records_decision(tmp_path: Path) -> None:
    from potstill.pipeline import PassManager, build_pipeline
    from potstill.state import CompileState

    model = _conv_net()
    state = CompileState(teacher=model, example_inputs=(torch.randn(1, 3, 32, 32),),
                         profile=_int8_profile(min_speedup=1000.0), out_dir=tmp_path)
    PassManager(build_pipeline("quantize.int8{calibration_samples=8}")).run(state)
    art = state.students[0].artifacts["onnxruntime"]
    assert {"quantized", "lowered"} <= state.facts
    assert art.precision == "fp32" and any("not faster enough" in n for n in art.notes)


def test_int8_transformer_like_runs(encoder: nn.Module, token_inputs: dict, tmp_path: Path) -> None:
    profile = _int8_profile(require_speedup=False, max_rel_error=0.1)
    art = lower(encoder, (), profile, tmp_path, example_kwargs=token_inputs)
    assert art.precision == "int8" and art.parity["ok"] and art.parity["rel"] <= 0.1
