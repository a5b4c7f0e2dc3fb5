"""Coupled-channel analysis on hand-built cases whose right answer is known."""

from __future__ import annotations

import torch
from potstill.ir.capture import analyze
from potstill.ir.surgery import masked_reference, prune_width
from potstill.ir.verify import verify_analysis
from torch import nn
from torch.nn import functional as F

from .archgen import Attention


def _group_of(a, param: str, dim: int):
    found = [g for g in a.groups for m in g.members if m.param == param and m.dim == dim]
    assert found, f"{param} dim {dim} is in no group"
    return found


def _members(g) -> set[tuple[str, int]]:
    return {(m.param, m.dim) for m in g.members}


class ConvChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.c2(F.relu(self.bn(self.c1(x))))


def test_conv_bn_conv_chain_is_one_group():
    a = analyze(ConvChain().eval(), (torch.randn(1, 3, 8, 8),))
    (g,) = _group_of(a, "c1.weight", 0)
    assert _members(g) == {
        ("c1.weight", 0), ("c1.bias", 0), ("bn.weight", 0), ("bn.bias", 0),
        ("bn.running_mean", 0), ("bn.running_var", 0), ("c2.weight", 1),
    }
    assert g.pinned is None and g.n_units == 8 and g.exact
    # input channels (model input) and output channels (model output) are pinned
    assert all(m.dim != 1 for m in g.members if m.param == "c1.weight")
    (out,) = _group_of(a, "c2.weight", 0)
    assert out.pinned == "model output"


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.side = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.body(h) + self.side(x)
        return self.head(h)


def test_residual_add_joins_every_tensor():
    a = analyze(Residual().eval(), (torch.randn(1, 3, 6, 6),))
    (g,) = _group_of(a, "stem.weight", 0)
    assert {("body.weight", 0), ("body.weight", 1), ("side.weight", 0), ("head.weight", 1)} <= _members(g)
    assert g.pinned is None


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_concat_shifts_indices():
    a = analyze(Concat().eval(), (torch.randn(1, 3, 5, 5),))
    ga = _group_of(a, "a.weight", 0)[0]
    gb = _group_of(a, "b.weight", 0)[0]
    assert ga.id != gb.id
    (ma,) = [m for m in ga.members if m.param == "c.weight"]
    (mb,) = [m for m in gb.members if m.param == "c.weight"]
    assert (ma.dim, ma.offset, ma.unit_len) == (1, 0, 1)
    assert (mb.dim, mb.offset, mb.unit_len) == (1, 4, 1)
    keep = {gb.id: [0, 5]}
    student = prune_width(Concat().eval(), a, keep)
    assert student.c.weight.shape == (2, 6, 1, 1)


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.g4 = nn.Conv2d(8, 12, 1, groups=4)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.out(self.g4(self.dw(self.c1(x))))


def test_depthwise_ties_in_and_out_and_grouped_conv_prunes_whole_groups():
    m = Grouped().eval()
    a = analyze(m, (torch.randn(1, 3, 6, 6),))
    (g,) = _group_of(a, "c1.weight", 0)
    assert ("dw.weight", 0) in _members(g)  # depthwise: out channel c reads only in channel c
    assert g.n_units == 4  # the grouped conv after it reads 4 groups of 2 channels
    (h,) = _group_of(a, "g4.weight", 0)
    assert h.id == g.id and h.kind == "conv_groups"
    student = prune_width(m, a, {g.id: [1, 3]})
    assert student.g4.groups == 2 and student.g4.weight.shape == (6, 2, 1, 1)
    assert student.dw.groups == 4
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(student(x), masked_reference(m, a, {g.id: [1, 3]})(x))


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.fc = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x):
        h = self.c(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        h = F.adaptive_avg_pool2d(h * s, 2)
        return self.fc(torch.flatten(h, 1))


def test_gate_joins_and_flatten_expands_units():
    m = Gate().eval()
    a = analyze(m, (torch.randn(1, 3, 8, 8),))
    (g,) = _group_of(a, "c.weight", 0)
    assert ("fc2.weight", 0) in _members(g) and ("fc1.weight", 1) in _members(g)
    (fm,) = [x for x in g.members if x.param == "fc.weight"]
    assert fm.dim == 1 and fm.unit_len == 4  # each channel is 2x2 flattened features
    student = prune_width(m, a, {g.id: [0, 2, 7]})
    assert student.fc.in_features == 12
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(student(x), masked_reference(m, a, {g.id: [0, 2, 7]})(x))


def test_attention_heads_and_gqa_groups():
    torch.manual_seed(0)
    m = nn.Sequential(Attention(16, heads=4, kv_heads=2, head_dim=4)).eval()
    a = analyze(m, (torch.randn(2, 5, 16),))
    (g,) = _group_of(a, "0.q_proj.weight", 0)
    assert g.kind == "kv_heads" and g.n_units == 2
    lens = {m.param: m.unit_len for m in g.members if m.dim == 0 and m.param.endswith("weight")}
    assert lens == {"0.q_proj.weight": 8, "0.k_proj.weight": 4, "0.v_proj.weight": 4}
    (o,) = [x for x in g.members if x.param == "0.o_proj.weight"]
    assert o.dim == 1 and o.unit_len == 8
    student = prune_width(m, a, {g.id: [1]})
    assert student[0].q_proj.out_features == 8 and student[0].k_proj.out_features == 4
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(student(x), masked_reference(m, a, {g.id: [1]})(x))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.ff = nn.Linear(12, 12)
        self.out = nn.Linear(12, 30, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.out(h + F.relu(self.ff(h)))


def test_tied_embeddings_couple_input_and_output():
    m = TiedLM().eval()
    a = analyze(m, (torch.randint(0, 30, (2, 4)),))
    (g,) = _group_of(a, "emb.weight", 1)
    assert g.kind == "hidden" and g.pinned is None
    assert ("ff.weight", 0) in _members(g) and ("ff.weight", 1) in _members(g)
    vocab = _group_of(a, "emb.weight", 0)[0]
    assert vocab.pinned is not None
    student = prune_width(m, a, {g.id: list(range(0, 12, 2))})
    assert student.out.weight is student.emb.weight and student.emb.weight.shape == (30, 6)
    ids = torch.randint(0, 30, (3, 4))
    torch.testing.assert_close(student(ids), masked_reference(m, a, {g.id: list(range(0, 12, 2))})(ids))


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        h = torch.sort(h, dim=-1).values  # mixes channels: no rule may treat it as elementwise
        return self.b(h)


def test_op_without_rule_pins_with_reason():
    a = analyze(Unknown().eval(), (torch.randn(2, 4),))
    (g,) = _group_of(a, "a.weight", 0)
    assert g.pinned is not None and "sort" in g.pinned
    assert "sort" in a.unknown_ops
    assert "pinned" in a.text()


def test_cost_model_counts_macs_and_params():
    m = ConvChain().eval()
    a = analyze(m, (torch.randn(2, 3, 8, 8),))
    macs_c1 = 2 * 8 * 6 * 6 * 3 * 9
    macs_c2 = 2 * 4 * 4 * 4 * 8 * 9
    assert a.cost.macs == macs_c1 + macs_c2
    assert a.cost.params == sum(p.numel() for p in m.parameters())
    (g,) = _group_of(a, "c1.weight", 0)
    assert abs(g.macs_per_unit - (macs_c1 / 8 + macs_c2 / 8)) < 1e-6
    assert a.cost.peak_activation_bytes >= 2 * 8 * 6 * 6 * 4


class Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.blocks = nn.Sequential(*[ResBlock(4) for _ in range(3)], nn.Conv2d(4, 4, 1))

    def forward(self, x):
        return self.blocks(self.stem(x))


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + F.relu(self.c(x))


def test_blocks_are_residual_children_only():
    a = analyze(Res().eval(), (torch.randn(1, 3, 5, 5),))
    assert [b.name for b in a.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(b.macs == 5 * 5 * 4 * 4 * 9 for b in a.blocks)


def test_verifier_finds_inconsistent_groups():
    a = analyze(ConvChain().eval(), (torch.randn(1, 3, 8, 8),))
    assert verify_analysis(a) == []
    g = a.prunable()[0]
    g.n_units *= 2  # members now overrun their tensors
    assert any("exceeds" in p for p in verify_analysis(a))
