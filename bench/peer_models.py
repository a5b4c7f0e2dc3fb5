"""Torch-Pruning's own test models, re-created as teachers (used by bench/peer_suite.py and
tests/compiler/test_peer_suite.py through `potstill compile`).

Every model in Torch-Pruning's ``tests/`` folder (VainF/Torch-Pruning v1.6.1) that needs no
torchvision: one factory per model, seeded, with the example input shapes its test uses (``PEERS``).
Weights the original leaves uninitialised (``torch.Tensor(n)``) get seeded random values here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, act: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout)]
    return [*layers, nn.GELU()] if act else layers


def _two_stage(cin: int, hidden: int, cout: int) -> nn.Sequential:
    """conv-bn-gelu-conv-bn, all 1x1."""
    return nn.Sequential(*_conv_bn(cin, hidden, act=True), *_conv_bn(hidden, cout))


class CascadedConcat(nn.Module):
    """Concats of concats: [[b1, b2], b3], b4 into one 1x1 conv (``test_cascaded_concat.py``)."""

    def __init__(self, dim: int = 10) -> None:
        super().__init__()
        self.block1 = _two_stage(dim, dim, dim)
        self.block2 = _two_stage(dim, 2 * dim, 2 * dim)
        self.block3 = nn.Sequential(*_conv_bn(dim, 3 * dim))
        self.block4 = nn.Sequential(*_conv_bn(dim, 6 * dim))
        self.head = nn.Conv2d(12 * dim, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.block1(x), self.block2(x)], dim=1)
        y = torch.cat([y, self.block3(x)], dim=1)
        return self.head(torch.cat([y, self.block4(x)], dim=1))


class WideDeep(nn.Module):
    """Wide & deep: a linear head and an MLP (BatchNorm1d, dropout) concatenated into a sigmoid
    output of width 1 (``test_concat.py``)."""

    def __init__(self, dim: int = 32, hidden: tuple[int, ...] = (32, 16)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(0.2)]
            width = h
        self.deep = nn.Sequential(*layers, nn.Linear(width, 1))
        self.wide = nn.Linear(dim, 3)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return torch.sigmoid(self.out(torch.concat([self.wide(x), self.deep(x)], dim=-1)))


class ConcatSplit(nn.Module):
    """A split whose first part joins a parallel path in a concat and whose second part is added
    back after the next conv (``test_concat_split.py``)."""

    def __init__(self, dim: int = 10) -> None:
        super().__init__()
        self.block1 = _two_stage(dim, dim, 2 * dim)
        self.parallel = _two_stage(dim, dim, dim)
        self.block2 = nn.Sequential(*_conv_bn(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.parallel(x)
        y = self.block1(x)
        first = self.block2[0].in_channels - self.parallel[-1].num_features
        a, b = torch.split(y, (first, y.shape[1] - first), 1)
        return self.block2(torch.cat([a, side], dim=1)) + b


class ScaledNorm(nn.Module):
    """x / ||x|| * scale + bias, then a square linear layer: the custom layer of
    ``test_customized_layer.py``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(dim))
        self.bias = nn.Parameter(0.1 * torch.randn(dim))
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / x.pow(2).sum(dim=1, keepdim=True).sqrt()
        return self.fc(x * self.scale + self.bias)


class CustomLayerNet(nn.Module):
    """fc -> relu -> ScaledNorm -> fc (``test_customized_layer.py``; with ``unused=True``, an extra
    parameter that forward never reads, ``test_unused_parameters.py``)."""

    def __init__(self, dim: int = 128, hidden: int = 256, classes: int = 10, unused: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.custom = ScaledNorm(hidden)
        self.fc2 = nn.Linear(hidden, classes)
        if unused:
            self.unused = nn.Parameter(torch.randn(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.custom(F.relu(self.fc1(x))))


class LeNet(nn.Module):
    """LeNet-5 on 28x28, with a view between the convs and the linears and a final ReLU
    (``test_dependency_lenet.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        return self.classifier(y.view(y.shape[0], -1))


class ResidualMLP(nn.Module):
    """fc1 -> relu -> fc2 -> relu, plus fc1's output as a skip (``test_fully_connected_layers.py``)."""

    def __init__(self, dim: int = 128, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.fc1(x))
        return self.fc3(F.relu(self.fc2(skip)) + skip)


class TwoInTwoOut(nn.Module):
    """Two inputs, each through its own linear, concatenated into a third; returns all three
    activations (``test_multiple_inputs_and_outputs.py``)."""

    def __init__(self, dims: tuple[int, int] = (128, 64), widths: tuple[int, int] = (32, 32)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dims[0], widths[0])
        self.fc2 = nn.Linear(dims[1], widths[1])
        self.fc3 = nn.Linear(sum(widths), 1000)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = F.relu(self.fc1(x1)), F.relu(self.fc2(x2))
        return a, b, F.relu(self.fc3(torch.cat([a, b], dim=1)))


class HeightCat(nn.Module):
    """Two paths concatenated along the height (not the channels), a conv, then split back along
    the height (``test_non_feature_dim_cat.py``; 512 channels as there)."""

    def __init__(self, dim: int = 512) -> None:
        super().__init__()
        self.block1 = _two_stage(dim, dim, dim)
        self.parallel = _two_stage(dim, dim, dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.block1(x), self.parallel(x)
        y = self.conv1(torch.cat([a, b], dim=2))
        top, _ = torch.split(y, [a.shape[2], b.shape[2]], dim=2)
        return self.conv2(top)


class ReshapeDecoder(nn.Module):
    """Linear -> view to 256x4x4 -> two transposed convs -> flatten -> linear
    (``test_reshape.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(512, 4096)
        self.up1 = nn.ConvTranspose2d(256, 128, kernel_size=4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(128, 64, kernel_size=4, stride=2, padding=1)
        self.head = nn.Linear(16384, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(x)).view(-1, self.up1.in_channels, 4, 4)
        x = F.relu(self.up2(F.relu(self.up1(x))))
        return self.head(torch.flatten(x, 1))


class ConvBnStack(nn.Module):
    """conv-bn-relu x3 ending in ``out`` channels, the middle one strided, or transposed with
    ``transpose=True`` (1 output channel: ``test_single_channel_output.py``; transposed, 8 out:
    ``TransposeModel`` of ``test_pruner.py`` / ``test_isomorphic.py``)."""

    def __init__(self, out: int = 1, transpose: bool = False) -> None:
        super().__init__()
        mid = nn.ConvTranspose2d(16, 64, 2, stride=2) if transpose else nn.Conv2d(16, 64, 2, stride=2)
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = mid, nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, out, 3, padding=1), nn.BatchNorm2d(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.relu(self.bn3(self.conv3(x)))


class SplitShared(nn.Module):
    """A 4x-wide conv split into three parts; the first two share one conv block, the third has
    its own; three outputs (``test_split.py``; 128 channels as there)."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.block1 = _two_stage(dim, dim, 4 * dim)
        self.shared = nn.Sequential(*_conv_bn(dim, dim))
        self.own = nn.Sequential(*_conv_bn(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.block1(x)
        c1, c2 = self.shared[0].in_channels, self.own[0].in_channels
        x1, x2, x3 = torch.split(x, [c1, c1, c2], dim=1)
        return self.shared(x1), self.shared(x2), self.own(x3)


class InplaceSkip(nn.Module):
    """conv1 -> conv2 -> conv3, conv1's output added back in place (``x += skip``), no activations
    (the ``Net`` of ``graph_drawing.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        skip = x
        x = self.conv3(self.conv2(x))
        x += skip
        return x


@dataclass(frozen=True)
class Peer:
    """A peer model: its factory here, its input shapes and the Torch-Pruning test it mirrors."""

    factory: str
    shapes: tuple[tuple[int, ...], ...]
    source: str


def _seeded(cls: Callable[..., nn.Module], **kw: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return cls(**kw).eval()

    make.__doc__ = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kw.items())}), seed 0, eval mode."
    return make


cascaded_concat = _seeded(CascadedConcat)
wide_deep = _seeded(WideDeep)
concat_split = _seeded(ConcatSplit)
customized_layer = _seeded(CustomLayerNet)
lenet = _seeded(LeNet)
residual_mlp = _seeded(ResidualMLP)
two_in_two_out = _seeded(TwoInTwoOut)
height_cat = _seeded(HeightCat)
reshape_decoder = _seeded(ReshapeDecoder)
single_channel_output = _seeded(ConvBnStack, out=1)
split_shared = _seeded(SplitShared)
unused_parameter = _seeded(CustomLayerNet, unused=True)
transpose_conv = _seeded(ConvBnStack, out=8, transpose=True)
inplace_skip = _seeded(InplaceSkip)

#: name -> the peer (factory name in this file, input shapes of its Torch-Pruning test, source);
#: images are 64x64 where the test's 224x224 only costs time (single_channel_output, transpose_conv)
PEERS: dict[str, Peer] = {
    "cascaded_concat": Peer("cascaded_concat", ((1, 10, 7, 7),), "tests/test_cascaded_concat.py"),
    "wide_deep": Peer("wide_deep", ((1, 32),), "tests/test_concat.py"),
    "concat_split": Peer("concat_split", ((1, 10, 7, 7),), "tests/test_concat_split.py"),
    "customized_layer": Peer("customized_layer", ((1, 128),), "tests/test_customized_layer.py"),
    "lenet": Peer("lenet", ((1, 1, 28, 28),), "tests/test_dependency_lenet.py"),
    "residual_mlp": Peer("residual_mlp", ((1, 128),), "tests/test_fully_connected_layers.py"),
    "two_in_two_out": Peer("two_in_two_out", ((1, 128), (1, 64)), "tests/test_multiple_inputs_and_outputs.py"),
    "height_cat": Peer("height_cat", ((1, 512, 7, 7),), "tests/test_non_feature_dim_cat.py"),
    "reshape_decoder": Peer("reshape_decoder", ((1, 512),), "tests/test_reshape.py"),
    "single_channel_output": Peer("single_channel_output", ((1, 3, 64, 64),), "tests/test_single_channel_output.py"),
    "split_shared": Peer("split_shared", ((1, 128, 7, 7),), "tests/test_split.py"),
    "unused_parameter": Peer("unused_parameter", ((1, 128),), "tests/test_unused_parameters.py"),
    "transpose_conv": Peer("transpose_conv", ((1, 3, 64, 64),), "tests/test_pruner.py, tests/test_isomorphic.py"),
    "inplace_skip": Peer("inplace_skip", ((1, 3, 32, 32),), "tests/graph_drawing.py"),
}
