"""Op rules with index maps: split/chunk, PReLU, einsum, ConvTranspose, layer scale, relative
position bias, gather — each checked structurally (which slices couple) and numerically (the
pruned student equals the teacher with the dropped units zeroed)."""

from __future__ import annotations

import pytest
import torch
from potstill.ir.capture import analyze
from potstill.ir.surgery import masked_reference, prune_width
from potstill.ir.types import RULES
from potstill.ir.verify import verify_analysis
from torch import nn
from torch.nn import functional as F

from .archgen import FusedAttention, StackedQKVAttention, SwiGLU
from .odd_ops import example_inputs, teacher


def _groups_with(a, param: str, dim: int):
    return [g for g in a.groups if any(m.param == param and m.dim == dim for m in g.members)]


def _spans(g, param: str) -> list[tuple[int, int, int]]:
    return sorted((m.dim, m.offset, m.unit_len) for m in g.members if m.param == param)


def _exact(model, a, keep, *inputs) -> nn.Module:
    student = prune_width(model, a, keep)
    with torch.no_grad():
        torch.testing.assert_close(student(*inputs), masked_reference(model, a, keep)(*inputs), atol=1e-5, rtol=1e-4)
    assert verify_analysis(analyze(student, inputs)) == []
    return student


@pytest.mark.parametrize("attention", [FusedAttention, StackedQKVAttention])
def test_fused_qkv_maps_each_chunk_to_its_rows(attention):
    """``qkv(x).split(E)`` (GPT-2) and ``qkv(x).reshape(B, N, 3, H, D).permute(...).unbind(0)`` (timm)."""
    torch.manual_seed(0)
    m = nn.Sequential(attention(8, heads=3, head_dim=2)).eval()
    x = torch.randn(2, 5, 8)
    a = analyze(m, (x,))
    (g,) = [g for g in _groups_with(a, "0.qkv.weight", 0) if g.kind == "heads"]
    assert g.pinned is None and g.n_units == 3
    # Q, K and V rows of head h sit at h*2, 6 + h*2, 12 + h*2: one group, three index-shifted members
    assert _spans(g, "0.qkv.weight") == [(0, 0, 2), (0, 6, 2), (0, 12, 2)]
    assert _spans(g, "0.proj.weight") == [(1, 0, 2)]
    student = _exact(m, a, {g.id: [0, 2]}, x)
    assert student[0].qkv.out_features == 12 and student[0].proj.in_features == 4


def test_chunked_gate_up_couples_gate_and_up_index_wise_and_einsum_is_a_linear():
    torch.manual_seed(0)
    m = nn.Sequential(SwiGLU(6, 5)).eval()
    x = torch.randn(2, 3, 6)
    a = analyze(m, (x,))
    (g,) = _groups_with(a, "0.gate_up.weight", 0)
    assert g.pinned is None and g.n_units == 5 and g.kind == "neurons"
    assert _spans(g, "0.gate_up.weight") == [(0, 0, 1), (0, 5, 1)]
    (down,) = [mm for mm in g.members if mm.param == "0.down"]
    assert (down.dim, down.role) == (1, "in")  # the einsum's contracted weight letter reads the channels
    assert g.macs_per_unit > 0
    _exact(m, a, {g.id: [1, 4]}, x)


class GluConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.act = nn.PReLU(4)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        v, gate = self.c(x).chunk(2, 1)
        return self.out(self.act(v * torch.sigmoid(gate)))


def test_glu_chunks_and_prelu_slopes_prune_with_their_channels():
    m = GluConv().eval()
    m.act.weight.data = torch.tensor([0.1, -0.5, 2.0, 0.7])
    x = torch.randn(2, 3, 4, 4)
    a = analyze(m, (x,))
    (g,) = _groups_with(a, "c.weight", 0)
    assert _spans(g, "c.weight") == [(0, 0, 1), (0, 4, 1)]
    assert ("act.weight", 0) in {(mm.param, mm.dim) for mm in g.members}
    student = _exact(m, a, {g.id: [0, 2]}, x)
    assert student.act.num_parameters == 2 and student.c.out_channels == 4
    torch.testing.assert_close(student.act.weight, torch.tensor([0.1, 2.0]))


class Decoder(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=groups)
        self.gamma = nn.Parameter(torch.randn(6, 1, 1))
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(self.gamma * F.relu(self.up(F.relu(self.enc(x)))))


def test_conv_transpose_weight_is_in_by_out():
    m = Decoder(groups=1).eval()
    x = torch.randn(2, 3, 8, 8)
    a = analyze(m, (x,))
    (g_in,) = _groups_with(a, "enc.weight", 0)
    assert ("up.weight", 0) in {(mm.param, mm.dim) for mm in g_in.members}
    (g_out,) = _groups_with(a, "up.weight", 1)
    assert {("up.bias", 0), ("gamma", 0), ("out.weight", 1)} <= {(mm.param, mm.dim) for mm in g_out.members}
    student = _exact(m, a, {g_in.id: [0, 3, 5], g_out.id: [1, 2]}, x)
    assert student.up.weight.shape == (3, 2, 2, 2) and student.gamma.shape == (2, 1, 1)
    # MACs of a transposed conv: every input element times a [C_out, k, k] slice
    assert a.cost.node_macs[next(n for n in a.cost.node_macs if "conv_transpose" in n)] == 2 * 8 * 4 * 4 * 6 * 4


def test_grouped_conv_transpose_prunes_whole_groups():
    m = Decoder(groups=2).eval()
    x = torch.randn(2, 3, 8, 8)
    a = analyze(m, (x,))
    (g,) = _groups_with(a, "enc.weight", 0)
    assert g.n_units == 2 and g.pinned is None
    student = _exact(m, a, {g.id: [1]}, x)
    assert student.up.groups == 1 and student.up.weight.shape == (4, 3, 2, 2) and student.out.in_channels == 3


def test_relative_position_bias_couples_with_heads_and_the_odd_ops_model_prunes():
    m, x = teacher(), example_inputs()
    a = analyze(m, x)
    assert a.unknown_ops == {}
    (heads,) = _groups_with(a, "attn.table", 1)
    assert heads.kind == "heads" and heads.pinned is None and heads.n_units == 4
    assert _groups_with(a, "attn.table", 0) == []  # table rows are looked up by index: not channels
    keep = {g.id: list(range(0, g.n_units, 2)) for g in a.prunable() if g.exact}
    student = _exact(m, a, keep, *x)
    assert analyze(student, x).cost.macs <= 0.8 * a.cost.macs


class Disentangled(nn.Module):
    """DeBERTa's content-to-position term: Q·(P·W_k)ᵀ gathered at relative positions."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.pos_k = nn.Linear(8, 8)
        self.rel = nn.Parameter(torch.randn(7, 8))
        self.o = nn.Linear(8, 8)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, 4).transpose(1, 2)  # [B, H, S, D]
        pk = self.pos_k(self.rel).view(7, -1, 4).transpose(0, 1)  # [H, 2S-1, D]
        c2p = q @ pk.transpose(-1, -2)  # [B, H, S, 2S-1]
        idx = (torch.arange(s)[None, :] - torch.arange(s)[:, None] + 3).expand(b, q.shape[1], s, s)
        att = torch.gather(c2p, -1, idx).softmax(-1)
        return self.o((att @ q).transpose(1, 2).reshape(b, s, -1))


def test_gather_of_relative_positions_keeps_heads_prunable():
    torch.manual_seed(0)
    m = Disentangled().eval()
    x = torch.randn(2, 4, 8)
    a = analyze(m, (x,))
    (g,) = _groups_with(a, "pos_k.weight", 0)
    assert g.kind == "heads" and g.pinned is None
    assert ("q.weight", 0) in {(mm.param, mm.dim) for mm in g.members}
    _exact(m, a, {g.id: [1]}, x)


def test_rules_exist_for_the_odd_ops():
    for op in ("split", "split_with_sizes", "chunk", "unbind", "prelu", "einsum", "conv_transpose1d",
               "conv_transpose2d", "index", "gather", "slice", "repeat_interleave", "tril", "triu"):
        assert op in RULES


class FusedGQA(nn.Module):
    """One projection cut into Q (4 heads), K and V (2 KV heads) by ``split_with_sizes`` or slices."""

    def __init__(self, slices: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 16)
        self.o = nn.Linear(8, 8)
        self.slices = slices

    def forward(self, x):
        b, s, _ = x.shape
        n = self.qkv.out_features // 4
        qkv = self.qkv(x)
        if self.slices:  # Phi-3 writes qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], ...
            q, k, v = qkv[..., : 2 * n], qkv[..., 2 * n : 3 * n], qkv[..., 3 * n :]
        else:
            q, k, v = qkv.split([2 * n, n, n], dim=-1)
        q, k, v = (t.view(b, s, -1, 2).transpose(1, 2) for t in (q, k, v))
        k, v = (t[:, :, None].expand(b, t.shape[1], 2, s, 2).reshape(b, -1, s, 2) for t in (k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.o(o.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("slices", [False, True])
def test_split_with_sizes_or_slices_of_a_grouped_query_projection_prune_kv_groups(slices):
    torch.manual_seed(0)
    m = FusedGQA(slices).eval()
    x = torch.randn(2, 3, 8)
    a = analyze(m, (x,))
    (g,) = [g for g in _groups_with(a, "qkv.weight", 0) if g.kind == "kv_heads"]
    assert g.n_units == 2 and g.pinned is None
    assert _spans(g, "qkv.weight") == [(0, 0, 4), (0, 8, 2), (0, 12, 2)]
    student = _exact(m, a, {g.id: [1]}, x)
    assert student.qkv.out_features == 8


class CausalMaskAttention(nn.Module):
    """Self-attention with a causal mask made by ``full((T, T))`` as BART/MVP build it: the mask is
    sized by the sequence length, a constant of the graph, and must not become a channel space."""

    def __init__(self, width: int, heads: int, tril: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.tril = heads, width // heads, tril
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        if self.tril:  # GPT-2's buffer, made in the forward: tril(ones(T, T))
            mask = torch.zeros(t, t).masked_fill(torch.tril(torch.ones(t, t)) == 0, torch.finfo(x.dtype).min)
        else:
            mask = torch.full((t, t), torch.finfo(x.dtype).min)
            cond = torch.arange(t)
            mask = mask.masked_fill(cond < (cond + 1).view(t, 1), 0.0)
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5 + mask[None, None]
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("tril", [False, True])
def test_a_mask_made_by_full_joins_the_sequence_and_leaves_the_heads_prunable(tril):
    # The mask's dims join the scores' sequence dims: they are no channels. Left as spaces of their
    # own, they would run on into the softmax over the keys, which would then pin the heads.
    torch.manual_seed(0)
    m = CausalMaskAttention(8, heads=4, tril=tril).eval()
    x = torch.randn(2, 6, 8)
    a = analyze(m, (x,))
    assert a.unknown_ops == {}
    (g,) = [g for g in _groups_with(a, "q.weight", 0) if g.kind == "heads"]
    assert g.pinned is None and g.n_units == 4 and g.sized_by is None
    assert ("v.weight", 0) in {(mm.param, mm.dim) for mm in g.members}
    student = _exact(m, a, {g.id: [0, 3]}, x)
    assert student.q.out_features == student.o.in_features == 4
