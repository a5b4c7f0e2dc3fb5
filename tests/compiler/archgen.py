"""Random architectures for property tests: programs of conv/linear/norm/activation ops.

A program is a list of instructions over a growing list of tensors. ``ConvProgram`` builds image
networks (convs of every grouping, BN/GN, residual adds, concats, squeeze-excite gates, pooling,
flatten into linear heads, GLUs over a chunked conv, per-channel PReLU, layer-scaled residuals,
ConvTranspose decoder layers); ``TokenProgram`` builds transformer-like networks (embeddings,
multi-head and grouped-query attention with shape-agnostic reshapes, fused-QKV attention split in
three, MLPs, SwiGLU MLPs with a chunked gate-up projection, einsum linear layers, residuals).
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "hswish": F.hardswish, "none": lambda x: x}


class ConvProgram(nn.Module):
    def __init__(self, program: list[tuple[Any, ...]], in_ch: int, head: str, n_out: int, hw: int) -> None:
        super().__init__()
        self.program = program
        self.in_ch = in_ch
        self.layers = nn.ModuleDict()
        chans = [in_ch]
        self.head = head
        for i, ins in enumerate(program):
            op = ins[0]
            if op == "conv":
                _, src, cout, k, grouping, norm, _act = ins
                cin = chans[src]
                if grouping == "dw":
                    groups, cout = cin, cin
                elif grouping == "g2" and cin % 2 == 0:
                    groups = 2
                    cout = cout + (cout % 2)
                else:
                    groups = 1
                mods: dict[str, nn.Module] = {"conv": nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups)}
                if norm == "bn":
                    mods["norm"] = nn.BatchNorm2d(cout)
                elif norm == "gn" and cout % 2 == 0:
                    mods["norm"] = nn.GroupNorm(2, cout)
                self.layers[str(i)] = nn.ModuleDict(mods)
                chans.append(cout)
            elif op == "res":
                _, src, k, _act = ins
                c = chans[src]
                self.layers[str(i)] = nn.ModuleDict({"conv": nn.Conv2d(c, c, k, padding=k // 2), "norm": nn.BatchNorm2d(c)})
                chans.append(c)
            elif op == "cat":
                _, a, b = ins
                chans.append(chans[a] + chans[b])
            elif op == "se":
                _, src, hidden = ins
                c = chans[src]
                self.layers[str(i)] = nn.ModuleDict({"fc1": nn.Conv2d(c, hidden, 1), "fc2": nn.Conv2d(hidden, c, 1)})
                chans.append(c)
            elif op == "add":
                _, a, b = ins
                chans.append(chans[a])
            elif op == "glu":  # one conv makes value and gate, chunked along channels
                _, src, c = ins
                self.layers[str(i)] = nn.ModuleDict({"conv": nn.Conv2d(chans[src], 2 * c, 1)})
                chans.append(c)
            elif op == "prelu":
                _, src = ins
                self.layers[str(i)] = nn.ModuleDict({"act": nn.PReLU(chans[src])})
                chans.append(chans[src])
            elif op == "ls":  # ConvNeXt: x + gamma * conv(x), gamma one scale per channel
                _, src = ins
                c = chans[src]
                self.layers[str(i)] = nn.ModuleDict({"conv": nn.Conv2d(c, c, 3, padding=1, groups=c),
                                                     "pw": nn.Conv2d(c, c, 1)})
                self.register_parameter(f"gamma{i}", nn.Parameter(torch.randn(c, 1, 1)))
                chans.append(c)
            elif op == "convT":
                _, src, cout, grouped = ins
                cin = chans[src]
                groups = 2 if grouped and cin % 2 == 0 and cout % 2 == 0 else 1
                self.layers[str(i)] = nn.ModuleDict({"conv": nn.ConvTranspose2d(cin, cout, 3, padding=1, groups=groups),
                                                     "norm": nn.BatchNorm2d(cout)})
                chans.append(cout)
        self.out_ch = chans[-1]
        feat = self.out_ch * (1 if head == "pool" else 4)
        self.fc1 = nn.Linear(feat, 12)
        self.fc2 = nn.Linear(12, n_out)
        self.hw = hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ts = [x]
        for i, ins in enumerate(self.program):
            op = ins[0]
            if op == "conv":
                layer = self.layers[str(i)]
                y = layer["conv"](ts[ins[1]])
                if "norm" in layer:
                    y = layer["norm"](y)
                ts.append(ACTS[ins[6]](y))
            elif op == "res":
                layer = self.layers[str(i)]
                ts.append(ts[ins[1]] + ACTS[ins[3]](layer["norm"](layer["conv"](ts[ins[1]]))))
            elif op == "cat":
                ts.append(torch.cat([ts[ins[1]], ts[ins[2]]], 1))
            elif op == "se":
                layer = self.layers[str(i)]
                s = ts[ins[1]].mean((2, 3), keepdim=True)
                ts.append(ts[ins[1]] * torch.sigmoid(layer["fc2"](F.relu(layer["fc1"](s)))))
            elif op == "add":
                ts.append(ts[ins[1]] + ts[ins[2]])
            elif op == "glu":
                value, gate = self.layers[str(i)]["conv"](ts[ins[1]]).chunk(2, dim=1)
                ts.append(value * torch.sigmoid(gate))
            elif op == "prelu":
                ts.append(self.layers[str(i)]["act"](ts[ins[1]]))
            elif op == "ls":
                layer = self.layers[str(i)]
                x = ts[ins[1]]
                ts.append(x + getattr(self, f"gamma{i}") * layer["pw"](F.gelu(layer["conv"](x))))
            elif op == "convT":
                layer = self.layers[str(i)]
                ts.append(F.relu(layer["norm"](layer["conv"](ts[ins[1]]))))
        y = ts[-1]
        y = F.adaptive_avg_pool2d(y, 1 if self.head == "pool" else 2)
        y = torch.flatten(y, 1)
        return self.fc2(F.relu(self.fc1(y)))


@st.composite
def conv_programs(draw: st.DrawFn) -> ConvProgram:
    in_ch = draw(st.sampled_from([1, 3]))
    n = draw(st.integers(1, 7))
    program: list[tuple[Any, ...]] = []
    chans = [in_ch]
    for _ in range(n):
        src = draw(st.integers(0, len(chans) - 1))
        kinds = ["conv", "res", "se", "glu", "prelu", "ls", "convT"]
        same = [j for j in range(len(chans)) if chans[j] == chans[src] and j != src]
        if len(chans) > 1:
            kinds.append("cat")
        if same:
            kinds.append("add")
        op = draw(st.sampled_from(kinds))
        if op == "conv":
            cout = draw(st.integers(2, 12))
            grouping = draw(st.sampled_from(["g1", "g1", "dw", "g2"]))
            ins: tuple[Any, ...] = ("conv", src, cout, draw(st.sampled_from([1, 3])), grouping,
                                    draw(st.sampled_from(["bn", "gn", "none"])), draw(st.sampled_from(sorted(ACTS))))
            if grouping == "dw":
                cout = chans[src]
            elif grouping == "g2" and chans[src] % 2 == 0:
                cout = cout + (cout % 2)
            chans.append(cout)
        elif op == "res":
            ins = ("res", src, draw(st.sampled_from([1, 3])), draw(st.sampled_from(sorted(ACTS))))
            chans.append(chans[src])
        elif op == "cat":
            b = draw(st.integers(0, len(chans) - 1))
            ins = ("cat", src, b)
            chans.append(chans[src] + chans[b])
        elif op == "se":
            ins = ("se", src, draw(st.integers(2, 4)))
            chans.append(chans[src])
        elif op == "glu":
            c = draw(st.integers(2, 8))
            ins = ("glu", src, c)
            chans.append(c)
        elif op in ("prelu", "ls"):
            ins = (op, src)
            chans.append(chans[src])
        elif op == "convT":
            cout = draw(st.integers(2, 10))
            ins = ("convT", src, cout, draw(st.booleans()))
            chans.append(cout)
        else:
            ins = ("add", src, draw(st.sampled_from(same)))
            chans.append(chans[src])
        program.append(ins)
    model = ConvProgram(program, in_ch, draw(st.sampled_from(["pool", "flat"])), draw(st.integers(2, 5)), 6)
    randomize(model, draw(st.integers(0, 10_000)))
    return model


def randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial norm statistics and affine parameters, so zeroing mistakes show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, nn.PReLU):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    model.eval()


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention whose reshapes follow the weights (``-1`` heads)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        if rep > 1:  # repeat_kv as in Llama
            k = k[:, :, None].expand(b, k.shape[1], rep, s, self.head_dim).reshape(b, -1, s, self.head_dim)
            v = v[:, :, None].expand(b, v.shape[1], rep, s, self.head_dim).reshape(b, -1, s, self.head_dim)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))


class FusedAttention(nn.Module):
    """One QKV projection split in three along its features (GPT-2 / timm style), heads by ``view``."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split(self.qkv.out_features // 3, dim=-1)
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, s, -1))


class StackedQKVAttention(FusedAttention):
    """timm's ViT attention: ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    """Fused gate-up projection chunked in two; the down projection is an einsum with a weight."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Parameter(torch.randn(dim, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return torch.einsum("bsh,dh->bsd", F.silu(gate) * up, self.down)


class TokenProgram(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: list[tuple[str, int, int, int, int]], n_out: int, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList()
        for kind, heads, kv, hd, ffn in layers:
            if kind == "attn":
                self.blocks.append(Attention(dim, heads, kv, hd))
            elif kind in ("fused", "stacked"):
                self.blocks.append((FusedAttention if kind == "fused" else StackedQKVAttention)(dim, heads, hd))
            elif kind == "swiglu":
                self.blocks.append(SwiGLU(dim, ffn))
            else:
                self.blocks.append(nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim)))
        self.tied = tied
        self.head = nn.Linear(dim, vocab if tied else n_out, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for blk in self.blocks:
            h = h + blk(h)
        return self.head(h)


@st.composite
def token_programs(draw: st.DrawFn) -> TokenProgram:
    dim = draw(st.sampled_from([8, 12, 16]))
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["attn", "mlp", "fused", "stacked", "swiglu"]))
        if kind == "attn":
            kv = draw(st.integers(1, 3))
            rep = draw(st.integers(1, 3))
            layers.append(("attn", kv * rep, kv, draw(st.sampled_from([2, 4])), 0))
        elif kind in ("fused", "stacked"):
            layers.append((kind, draw(st.integers(1, 4)), 0, draw(st.sampled_from([2, 4])), 0))
        else:
            layers.append((kind, 0, 0, 0, draw(st.integers(4, 24))))
    model = TokenProgram(20, dim, layers, draw(st.integers(2, 5)), draw(st.booleans()))
    torch.manual_seed(draw(st.integers(0, 10_000)))
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    return model.eval()
