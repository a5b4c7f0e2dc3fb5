"""State-space models (Mamba): the inner width of each mixer is one prunable coupled group.

The scan state is a tensor the mixer makes (``torch.zeros(b, intermediate_size, state)``); the
factory-op rule lets its dims take the channels they are joined with, surgery updates the
mixer's own width attributes, and the trial surgery pins what the narrowed forward cannot follow
(Mamba's ``time_step_rank`` split). The engine runs the recurrence as an ONNX ``Scan``
(``potstill.inputs.ssm``), so it takes any sequence length. Mamba2's heads prune with the B and C
of their group (``repeat_interleave`` carries a group to its heads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")


def _mamba(seed: int = 0) -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                         conv_kernel=4, use_cache=False)
    return MambaForCausalLM(config).eval()


def _inner_groups(analysis: Any) -> list[Any]:
    return [g for g in analysis.groups if any(m.param.endswith("mixer.D") for m in g.members)]


def test_the_inner_width_is_one_prunable_group_per_layer() -> None:
    from potstill.ir.capture import analyze
    from potstill.ir.surgery import masked_reference, prune_width

    model = _mamba()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    analysis = analyze(model, (), {"input_ids": ids})
    inner = _inner_groups(analysis)
    assert len(inner) == 2
    for g in inner:
        assert g.pinned is None and g.n_units == 64 and g.exact, g
        members = {(m.param.split("mixer.")[1], m.dim, m.offset) for m in g.members}
        assert {("in_proj.weight", 0, 0), ("in_proj.weight", 0, 64), ("conv1d.weight", 0, 0), ("conv1d.bias", 0, 0),
                ("x_proj.weight", 1, 0), ("dt_proj.weight", 0, 0), ("dt_proj.bias", 0, 0), ("A_log", 0, 0),
                ("D", 0, 0), ("out_proj.weight", 1, 0)} <= members, members
    # the dt rank is split off x_proj's output by an attribute surgery does not follow: the trial pins it
    rank = [g for g in analysis.groups if g.n_units == 2 and any("dt_proj" in m.param for m in g.members)]
    assert rank and all(g.pinned and "split" in g.pinned for g in rank)
    keep = {g.id: list(range(0, g.n_units, 2)) for g in inner}
    student, reference = prune_width(model, analysis, keep).eval(), masked_reference(model, analysis, keep).eval()
    assert [m.intermediate_size for n, m in student.named_modules() if n.endswith("mixer")] == [32, 32]
    with torch.no_grad():
        got, want = student(input_ids=ids).logits, reference(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-5


def _mamba2(n_groups: int) -> nn.Module:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    config = Mamba2Config(vocab_size=128, hidden_size=32, state_size=6, num_hidden_layers=2, expand=2, head_dim=16,
                          num_heads=4, n_groups=n_groups, conv_kernel=3, chunk_size=5, use_cache=False)
    return Mamba2ForCausalLM(config).eval()


@pytest.mark.parametrize(("n_groups", "units"), [(1, 4), (2, 2)])
def test_mamba2_heads_prune_with_the_b_and_c_of_their_group(n_groups: int, units: int, monkeypatch) -> None:
    """Mamba2 repeats each group's B and C to its heads (``repeat_interleave``): with one group the
    copy takes any head, so every head is a unit; with two, a unit is a group with its B and C."""
    from potstill.ir.capture import analyze
    from potstill.ir.surgery import masked_reference, prune_width
    from torch.nn import functional as F
    from transformers.models.mamba2 import modeling_mamba2

    # HF's gated norm takes its statistic over all heads (inexact); a per-channel gate makes the
    # pruned student comparable with the masked teacher to float error
    monkeypatch.setattr(modeling_mamba2.MambaRMSNormGated, "forward", lambda self, h, gate=None: self.weight * h * F.silu(gate))
    model = _mamba2(n_groups)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    analysis = analyze(model, (), {"input_ids": ids})
    heads = [g for g in analysis.groups if any(m.param.endswith("mixer.A_log") for m in g.members)]
    assert len(heads) == 2 and all(g.pinned is None and g.exact and g.n_units == units for g in heads), heads
    offsets = {(m.param.split("mixer.")[1], m.offset) for m in heads[0].members if m.dim == 0}
    # in_proj's rows: gate [0, 64), x [64, 128), B, C (6 per group), dt (one per head); conv1d's: x, B, C
    b_and_c = {("in_proj.weight", 128), ("in_proj.weight", 128 + 6 * n_groups), ("conv1d.weight", 64),
               ("conv1d.weight", 64 + 6 * n_groups)}
    assert {("in_proj.weight", 0), ("in_proj.weight", 64), ("conv1d.weight", 0)} <= offsets
    assert (b_and_c <= offsets) if n_groups > 1 else not (b_and_c & offsets), offsets
    keep = {g.id: list(range(0, units, 2)) for g in heads}
    student, reference = prune_width(model, analysis, keep).eval(), masked_reference(model, analysis, keep).eval()
    mixer = student.backbone.layers[0].mixer
    assert (mixer.num_heads, mixer.n_groups, mixer.intermediate_size, mixer.conv_kernel_size) == (
        2, max(1, n_groups // 2), 32, 3)
    x = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = student(input_ids=x).logits, reference(input_ids=x).logits
    assert float((got - want).abs().max()) < 1e-5


class _Scan(nn.Module):
    """A state made by ``zeros`` at a width: from an attribute (``follow``) or a constant."""

    def __init__(self, follow: bool) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 16), nn.Linear(16, 4)
        self.decay = nn.Parameter(torch.rand(16))
        self.inner_size, self.follow = 16, follow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        state = torch.zeros(x.shape[0], self.inner_size if self.follow else 16)
        for t in range(x.shape[1]):
            state = state * self.decay + h[:, t]
        return self.down(state)


@pytest.mark.parametrize("follow", [True, False])
def test_a_state_made_by_zeros_prunes_only_where_the_forward_follows(follow: bool) -> None:
    from potstill.ir.capture import analyze

    analysis = analyze(_Scan(follow).eval(), (torch.randn(2, 3, 4),))
    g = next(g for g in analysis.groups if any(m.param == "decay" for m in g.members))
    assert g.sized_by
    if follow:
        assert g.pinned is None
    else:
        assert g.pinned and "fails once a unit is removed" in g.pinned


def test_compile_prunes_the_inner_width_reloads_and_matches_the_engine(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort
    from potstill import load_student
    from potstill.cli import main

    teacher = tmp_path / "mamba"
    _mamba().save_pretrained(teacher)
    out = tmp_path / "out"
    assert main(["compile", f"hf:{teacher}", "--ratio", "0.5", "--no-distill", "--no-teacher-timing",
                 "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    student = manifest["students"][0]
    assert student["macs"] <= 0.8 * manifest["teacher"]["macs"], (student["macs"], manifest["teacher"]["macs"])
    assert student["parity"]["ok"] and student["parity"]["max_abs"] < 1e-4, student["parity"]
    student_dir = out / student["dir"]
    model = load_student(student_dir).eval()
    widths = [m.intermediate_size for n, m in model.named_modules() if n.endswith("mixer")]
    assert widths and all(w < 64 for w in widths), widths
    # the scan is exported over a symbolic time axis: the engine takes other lengths than the example's 32
    assert any("ONNX Scan" in n for n in student["notes"]), student["notes"]
    session = ort.InferenceSession(str(student_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert all(i.shape == ["batch", "sequence"] for i in session.get_inputs()), [i.shape for i in session.get_inputs()]
    gen = torch.Generator().manual_seed(5)
    for batch, length in ((2, 32), (3, 11), (1, 45)):
        ids = torch.randint(0, 128, (batch, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        feeds = {"input_ids": ids, "attention_mask": mask}
        with torch.no_grad():
            expect = model(**feeds).logits.numpy()
        got = session.run([session.get_outputs()[0].name], {k: v.numpy() for k, v in feeds.items() if k in names})[0]
        assert got.shape == expect.shape and float(np.abs(expect).max()) > 1e-3
        assert float(np.abs(got - expect).max()) < 1e-4, (batch, length)


def test_the_scan_forward_computes_the_loop_and_is_undone() -> None:
    from potstill.inputs.ssm import scan_friendly_ssm

    model = _mamba(seed=3)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with scan_friendly_ssm(model) as swapped:
            assert swapped == 2
            assert all("slow_forward" in vars(m) for n, m in model.named_modules() if n.endswith("mixer"))
            got = model(input_ids=ids, attention_mask=mask).logits
    assert float((got - want).abs().max()) < 1e-5
    assert not any("slow_forward" in vars(m) for m in model.modules())
