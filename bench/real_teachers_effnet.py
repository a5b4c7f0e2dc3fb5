"""EfficientNet-Lite0 as a teacher file for ``bench/real_teachers.py``: the CLI bench's teacher, plus
``preprocess(image)`` so a folder of photos (``--data PHOTOS/``) becomes inputs scaled as the
teacher's (``prune_effnet_teacher.NORM``).

    potstill compile bench/real_teachers_effnet.py:teacher --ratio 0.5 --data PHOTOS/ --train-minutes 10 -o OUT
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prune_effnet_teacher as _effnet

MEAN, STD = (torch.tensor(v).view(3, 1, 1) for v in _effnet.C.NORMS[_effnet.NORM])


def teacher() -> torch.nn.Module:
    return _effnet.teacher()


def example_inputs() -> tuple[torch.Tensor]:
    return _effnet.example_inputs()


def calib_data() -> Iterator[torch.Tensor]:
    """64 photo crops (seed 2): calibration and the compile's own held-out split, never trained on."""
    return _effnet.calib_data()


def preprocess(image: Any) -> torch.Tensor:
    """A PIL photo -> ``[3, 224, 224]``: resize, centre crop, the teacher's scaling."""
    from potstill.inputs.data import resize_center_crop

    return (resize_center_crop(image, 224, 224) - MEAN) / STD


def save_photos(folder: Path, n: int = 20, seed: int = 4) -> Path:
    """``n`` photo crops (``_common.real_images``, a seed the held-out crops do not use) as PNG files."""
    import _common as C
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    x = C.real_images(n, seed=seed, norm=_effnet.NORM) * STD + MEAN
    for i, img in enumerate(x):
        arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / f"photo{i:02d}.png")
    return folder
