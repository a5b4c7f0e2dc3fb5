"""Expansion-only pruning of inverted-residual blocks: residual widths stay, projections are refitted."""

from __future__ import annotations

import copy

import pytest
import torch
from potstill.inputs.data import Batch
from potstill.ir.capture import analyze
from potstill.ir.surgery import prune_width
from potstill.passes.prune.allocate import sensitivity_allocate
from potstill.passes.prune.expansion import (
    apply_refit,
    expansion_groups,
    input_grams,
    obs_order,
    refit_closed_form,
    scaled_weight,
)
from potstill.passes.prune.heldout import HeldoutReference
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState
from torch import nn


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, BN, ReLU6, 3x3 depthwise, BN, ReLU6, 1x1 project, BN (+ x)."""

    def __init__(self, cin: int, cout: int, t: int, stride: int = 1) -> None:
        super().__init__()
        hid = cin * t
        self.expand = nn.Conv2d(cin, hid, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(hid)
        self.dw = nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False)
        self.bn1 = nn.BatchNorm2d(hid)
        self.project = nn.Conv2d(hid, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.clamp(self.bn0(self.expand(x)), 0, 6)
        y = self.bn2(self.project(torch.clamp(self.bn1(self.dw(y)), 0, 6)))
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 6), InvertedResidual(8, 16, 6, 2),
                                    InvertedResidual(16, 16, 4))  # fmt: skip
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def tiny_mobilenet() -> TinyMobileNet:
    torch.manual_seed(0)
    m = TinyMobileNet()
    with torch.no_grad():  # non-trivial BN statistics, as a trained model has
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
    return m.eval()


def images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


def _state(model: nn.Module) -> CompileState:
    calib, held = images(6, 1), images(2, 2)
    return CompileState.from_teacher(model, (calib[0][:1],), calib_data=lambda: iter(calib),
                                     heldout_data=lambda: iter(held))  # fmt: skip


def _residual_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if n.endswith("project") or n.endswith("projection.convolution")}


def test_expansion_groups_are_the_inside_of_each_block():
    model = tiny_mobilenet()
    a = analyze(model, (torch.randn(1, 3, 16, 16),))
    exps = expansion_groups(model, a, a.prunable())
    assert [e.projection for e in exps] == ["blocks.0.project", "blocks.1.project", "blocks.2.project"]
    assert [a.groups[e.group].n_units for e in exps] == [48, 48, 64]
    assert [e.norm for e in exps] == ["blocks.0.bn2", "blocks.1.bn2", "blocks.2.bn2"]


def test_default_pruning_keeps_every_residual_width():
    model = tiny_mobilenet()
    state = _state(model)
    state.new_student("s")
    PassManager(build_pipeline("prune.width{ratio=0.4}")).run(state)
    student = state.students[0]
    pruned = student.module
    assert _residual_widths(pruned) == _residual_widths(model)
    assert pruned.stem[0].out_channels == 8 and pruned.head.in_features == 16
    hidden = [pruned.blocks[i].dw.out_channels for i in range(3)]
    assert hidden != [48, 48, 64] and all(h % 8 == 0 for h in hidden)
    rec = student.metrics["prune"]
    assert rec["scope"] == "expansion" and rec["allocation"] == "sensitivity" and rec["refit"] == "full"
    assert rec["macs_after"] <= 0.62 * rec["macs_before"]
    x = torch.randn(2, 3, 16, 16)
    assert pruned(x).shape == model(x).shape
    # pruning every group by a fraction (not the default) narrows the residual stream too
    state2 = _state(model)
    state2.new_student("s")
    PassManager(build_pipeline("prune.width{per_kind=[channels=0.5],align=4}")).run(state2)
    assert _residual_widths(state2.students[0].module) != _residual_widths(model)


def test_hf_mobilenet_v2_keeps_every_residual_width():
    transformers = pytest.importorskip("transformers")
    config = transformers.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.35, num_labels=4,
                                            min_depth=8)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MobileNetV2ForImageClassification(config).eval()
    calib = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    held = [torch.randn(2, 3, 32, 32)]
    state = CompileState.from_teacher(model, (calib[0][:1],), calib_data=lambda: iter(calib),
                                      heldout_data=lambda: iter(held))  # fmt: skip
    a = state.teacher_analysis()
    exps = expansion_groups(model, a, a.prunable())
    assert len(exps) >= 10
    state.new_student("s")
    PassManager(build_pipeline("prune.width{ratio=0.3}")).run(state)
    pruned = state.students[0].module

    def widths(m: nn.Module) -> dict[str, int]:
        return {n: c.out_channels for n, c in m.named_modules()
                if isinstance(c, nn.Conv2d) and c.groups == 1 and "expand_1x1" not in n and "first_conv" not in n}

    # projections and the head conv: every width on the residual path (the stem's output feeds only
    # the first depthwise conv, so it is the first block's expansion)
    assert widths(pruned) == widths(model)
    dws = [(n, c.out_channels) for n, c in pruned.named_modules() if isinstance(c, nn.Conv2d) and c.groups > 1]
    teacher_dws = {n: c.out_channels for n, c in model.named_modules() if isinstance(c, nn.Conv2d) and c.groups > 1}
    assert any(w < teacher_dws[n] for n, w in dws)
    assert pruned(held[0]).logits.shape == model(held[0]).logits.shape


def test_obs_refit_is_exact_when_dropped_channels_are_combinations_of_kept_ones():
    """Channels 4..7 of the projection's input are linear combinations of 0..3: dropping them and
    refitting loses nothing, while slicing alone does; the OBS order removes them first."""
    torch.manual_seed(0)
    base = torch.randn(4096, 4)
    mix = torch.randn(4, 4)
    a = torch.cat([base, base @ mix], 1)
    w = torch.randn(3, 8, dtype=torch.float64)
    a1 = torch.cat([a, torch.ones(len(a), 1)], 1).double()
    gram = a1.T @ a1
    order, err = obs_order(w, gram, ridge=1e-9)
    kept = sorted(order[4:])
    assert len(kept) == 4
    wk, b = refit_closed_form(w, gram, kept, ridge=1e-9)
    y = a.double() @ w.T
    refit_err = float(((a.double()[:, kept] @ wk.T + b - y) ** 2).sum() / (y**2).sum())
    plain_err = float(((a.double()[:, kept] @ w[:, kept].T - y) ** 2).sum() / (y**2).sum())
    assert refit_err < 1e-6
    assert plain_err > 0.05
    assert err[4] == pytest.approx(refit_err * float((y**2).sum()), rel=1e-2, abs=1e-3)


def test_closed_form_refit_lowers_the_blocks_error_in_the_model():
    model = tiny_mobilenet()
    x = images(4, 1)
    a = analyze(model, (x[0][:1],))
    (exp, *_) = expansion_groups(model, a, a.prunable())
    batches = [Batch((b,)) for b in x]
    gram = input_grams(model, [exp.projection], batches)[exp.projection]
    order, _ = obs_order(scaled_weight(model, exp), gram)
    kept = sorted(order[24:])
    plain = prune_width(model, a, {exp.group: kept})
    refit = copy.deepcopy(plain)
    w = model.blocks[0].project.weight.detach().double().reshape(8, -1)
    apply_refit(refit, exp, *refit_closed_form(w, gram, kept))
    ref = HeldoutReference.of(model, [Batch((b,)) for b in images(2, 5)])
    assert ref.loss(refit) < ref.loss(plain)


def test_sensitivity_allocation_spends_on_the_least_sensitive_group():
    curves = {0: [(8, 0.0, 0.0), (6, 0.1, 5.0), (4, 0.2, 10.0)], 1: [(8, 0.0, 0.0), (6, 3.0, 5.0), (4, 9.0, 10.0)]}
    assert sensitivity_allocate(curves, 10.0) == {0: 4, 1: 8}
    assert sensitivity_allocate(curves, 15.0) == {0: 4, 1: 6}
    assert sensitivity_allocate(curves, 0.0) == {0: 8, 1: 8}
    # a width whose loss lies above the chord of its neighbours is skipped (convex hull)
    bumpy = {0: [(8, 0.0, 0.0), (6, 5.0, 5.0), (4, 6.0, 10.0)]}
    assert sensitivity_allocate(bumpy, 5.0) == {0: 4}
