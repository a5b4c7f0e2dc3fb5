"""Generality zoo, vision: ViT, DeiT, DINOv2, Swin (hierarchical), and the CNNs ResNet, ConvNeXt,
RegNet, MobileNetV2, EfficientNet.
The check is ``zoo_hf_families.check_family`` (compile, reload, engine on fresh shapes)."""

from __future__ import annotations

import pytest

from .zoo_hf_families import check_family, zoo_params

pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo_params(("vit", "deit", "dinov2", "swin", "resnet", "convnext", "regnet", "mobilenet-v2", "efficientnet")))
def test_vision_family(name: str, tmp_path) -> None:
    check_family(name, tmp_path)
