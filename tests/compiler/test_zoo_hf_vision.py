"""Generality zoo, vision (ViT, DeiT, DINOv2, hierarchical Swin, CNNs: ResNet, ConvNeXt, RegNet, MobileNetV2, EfficientNet).

Each tiny random-weight family is compiled with ``--ratio 0.5 --no-distill`` through
``compile_teacher``, must lose at least 20 % of its MACs, reload through ``potstill.load_student``
(and ``AutoModel`` where the record promises it) and match its ONNX engine in ONNX Runtime on fresh
inputs of another batch size and sequence length (see ``zoo_hf_families.compile_and_check``).
"""

from __future__ import annotations

import pytest

from .zoo_hf_families import SHORTFALLS, compile_and_check

pytest.importorskip("transformers")
FAMILIES = ("vit", "deit", "dinov2", "swin", "resnet", "convnext", "regnet", "mobilenet-v2", "efficientnet")


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=SHORTFALLS[n])) if n in SHORTFALLS else n
    for n in FAMILIES
])
def test_family_compiles_prunes_reloads_and_matches_its_engine(name: str, tmp_path) -> None:
    row = compile_and_check(name, tmp_path)
    assert row["macs_after"] <= 0.8 * row["macs_before"], (
        f"{name}: {row['macs_after']} of {row['macs_before']} MACs left; pinned: {row['pinned']}")
    assert row["loaders"][0] == "potstill.load_student"
