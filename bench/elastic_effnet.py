"""Label-free training data for EfficientNet-Lite0 as an elastic teacher: augmented photos.

    potstill compile bench/prune_effnet_teacher.py:teacher --elastic --students 3 --speedup 1.3 \
        --data bench/elastic_effnet.py:train_data -o OUT

``train_data()`` draws 128 random crops (35-100 % of the short side, random flips) of the dozen
scikit-image / scikit-learn photographs, in batches of 16, with a fresh draw on every call (each
epoch sees new crops: RS2-style resampling, Okanovic et al. 2023). No labels: the supernet learns
from the teacher's outputs. The held-out crops that ``bench/elastic_cli.py effnet`` scores on are a
different draw (seed 1); the calibration crops are ``calib_data()`` of the teacher file (seed 2).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

_DRAWS = itertools.count(100)


def train_data(n: int = 128, batch_size: int = 16) -> Iterator[torch.Tensor]:
    """``n`` augmented crops in batches, a new draw per call."""
    imgs = C.real_images(n, seed=next(_DRAWS), norm="inception")
    for i in range(0, n, batch_size):
        yield imgs[i:i + batch_size]
