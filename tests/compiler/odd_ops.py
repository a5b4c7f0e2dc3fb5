"""A small custom CNN + token mixer built from the ops pruners tend to miss (issue 10 item 3).

``potstill compile tests/compiler/odd_ops.py:teacher --ratio 0.5 -o OUT --no-distill`` must prune it:
grouped convolutions (RegNet-style), PReLU with a slope per channel, ConvNeXt layer scale
(``gamma * x``), a ConvTranspose decoder, a fused QKV projection split into Q, K, V with a learned
relative-position bias per head, an einsum linear layer, and a SwiGLU MLP whose fused gate-up
projection is chunked.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class GroupedBlock(nn.Module):
    """RegNet's X block: 1x1, grouped 3x3 (groups > 1, not depthwise), 1x1, residual, layer scale."""

    def __init__(self, c: int, hidden: int, group_width: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, hidden, 1)
        self.act_a = nn.PReLU(hidden)
        self.b = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden // group_width)
        self.bn = nn.BatchNorm2d(hidden)
        self.c = nn.Conv2d(hidden, c, 1)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_a(self.a(x))
        h = F.relu(self.bn(self.b(h)))
        return x + self.gamma * self.c(h)


class RelPosAttention(nn.Module):
    """Fused QKV (one projection, ``split``) with a per-head relative position bias table (Swin)."""

    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads) * 0.1)
        pos = torch.arange(tokens)
        self.register_buffer("rel_index", (pos[:, None] - pos[None, :] + tokens - 1).flatten(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split(self.qkv.out_features // 3, dim=-1)
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        bias = self.table[self.rel_index].view(s, s, -1).permute(2, 0, 1)
        att = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5 + bias
        o = att.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    """Fused gate-up projection chunked in two; the down projection is an einsum with its weight."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Parameter(torch.randn(dim, hidden) * hidden**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return torch.einsum("bsh,dh->bsd", F.silu(gate) * up, self.down)


class OddOps(nn.Module):
    def __init__(self, n_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.stem_act = nn.PReLU(32)
        self.stages = nn.Sequential(GroupedBlock(32, 64, 8), GroupedBlock(32, 64, 8))
        self.down = nn.Conv2d(32, 48, 2, stride=2)
        self.up = nn.ConvTranspose2d(48, 24, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(24)
        self.to_tokens = nn.Conv2d(24, 32, 4, stride=4)
        self.attn = RelPosAttention(32, heads=4, tokens=16)
        self.norm = nn.LayerNorm(32)
        self.mlp = SwiGLU(32, 96)
        self.head = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem_act(self.stem(x)))
        h = F.relu(self.up_bn(self.up(F.relu(self.down(h)))))
        t = self.to_tokens(h).flatten(2).transpose(1, 2)  # [B, 16, 32]
        t = t + self.attn(t)
        t = t + self.mlp(self.norm(t))
        return self.head(t.mean(1))


def teacher() -> nn.Module:
    torch.manual_seed(0)
    model = OddOps()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial norm statistics so zeroing mistakes show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
