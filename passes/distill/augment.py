"""Label-free image augmentation for distilling on a few photos: random resized crops, flips, colour jitter.

With only a handful of photos, a student that sees the same pixels every epoch learns the teacher's
answers on those pixels only. Each step instead sees a new view of every image (the teacher sees
the same view, so no label is needed; Beyer et al. 2022, "Knowledge distillation: A good teacher
is patient and consistent", arXiv 2106.05237, augment consistently for teacher and student):

- **random resized crop** (Szegedy et al. 2015, torchvision's ``RandomResizedCrop``): an area
  fraction ``a ~ U(scale)`` and aspect ``r ~ logU(ratio)`` give a window ``w = sqrt(a r)``,
  ``h = sqrt(a / r)`` (in units of the image side, clipped to 1) at a uniform position, resampled
  to the input size by bilinear ``grid_sample`` of the affine map ``[[w, 0, cx], [0, h, cy]]``;
- **horizontal flip** with probability 1/2 (the map's ``w`` negated);
- **colour jitter** in the model's input space, per image: brightness adds ``b σ`` (``σ`` the
  image's std, ``b ~ U(±brightness)``); contrast ``μ_c + k (x − μ_c)`` about each channel's mean,
  ``k ~ U(1 ± contrast)``; saturation ``g + s (x − g)`` about the per-pixel channel mean ``g``,
  ``s ~ U(1 ± saturation)`` (3-channel images only). These are affine per channel, so they act the
  same whether or not the pixels were normalised: no mean or std needs to be known.

torchvision is not used (its C ops do not load against this CPU build of torch); all of it is a
few batched tensor ops. Seeded by a ``torch.Generator``: the same seed gives the same views.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from potstill.inputs.data import Batch, as_batch


@dataclass(frozen=True)
class Augment:
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A new random view of every image of ``x`` ``[N, C, H, W]`` (same shape and dtype)."""
        return self.jitter(self.crop_flip(x, g), g)

    def crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]

        def u(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=g)

        area = u(*self.scale)
        aspect = torch.exp(u(math.log(self.ratio[0]), math.log(self.ratio[1])))
        w = (area * aspect).sqrt().clamp(max=1.0)
        h = (area / aspect).sqrt().clamp(max=1.0)
        cx = (1 - w) * (2 * torch.rand(n, generator=g) - 1)  # the window stays inside the image
        cy = (1 - h) * (2 * torch.rand(n, generator=g) - 1)
        sign = torch.where(torch.rand(n, generator=g) < self.flip, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="reflection", align_corners=False)

    def jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]

        def u(spread: float) -> torch.Tensor:
            return ((2 * torch.rand(n, generator=g) - 1) * spread).view(n, 1, 1, 1).to(x.device, x.dtype)

        std = x.flatten(1).std(dim=1).view(n, 1, 1, 1)
        x = x + u(self.brightness) * std
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = mean + (1 + u(self.contrast)) * (x - mean)
        if x.shape[1] == 3:
            grey = x.mean(dim=1, keepdim=True)
            x = grey + (1 + u(self.saturation)) * (x - grey)
        return x


def image_tensor(batch: Batch) -> tuple[str | int, torch.Tensor] | None:
    """Where a batch carries images: ``("pixel_values" or 0, [N, C, H, W] float)``, else None."""
    pixels = batch.kwargs.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.dim() == 4 and pixels.is_floating_point():
        return "pixel_values", pixels
    if len(batch.args) == 1 and not batch.kwargs:
        x = batch.args[0]
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point():
            return 0, x
    return None


class AugmentedImages:
    """A data source whose image batches come out as fresh random views each epoch.

    The views of epoch ``e``, batch ``i`` depend on ``(seed, e, i)`` only, so a resumed run and
    every student of a compile see the same views. Labels and other inputs pass through.
    """

    def __init__(self, source: Callable[..., Iterable[Any]] | Iterable[Any], seed: int = 0,
                 augment: Augment | None = None) -> None:  # fmt: skip
        self.source, self.seed, self.augment = source, seed, augment or Augment()

    def __call__(self, epoch: int = 0) -> Iterator[Batch]:
        from .batches import epoch_batches

        for i, raw in enumerate(epoch_batches(self.source, self.seed, epoch)):
            batch = as_batch(raw)
            where = image_tensor(batch)
            if where is None:
                yield batch
                continue
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + i)
            key, x = where
            view = self.augment(x, g)
            if key == 0:
                yield Batch((view,), {}, batch.target)
            else:
                yield Batch(batch.args, {**batch.kwargs, str(key): view}, batch.target)


#: augment=None augments image data of fewer images than this (a few photos; a large set is its own variety)
AUGMENT_BELOW = 1000


def wants_augment(data: Any, asked: bool | None, where: str) -> bool:
    """Whether image augmentation runs on the training ``data``: as ``asked``, or (None) when its
    batches are images, fewer than ``AUGMENT_BELOW`` of them. ``asked=True`` on data without images
    is an error that names the pass ``where``."""
    from .methods import require

    if asked is False:
        return False
    n = image_count(data, AUGMENT_BELOW)
    images = n > 0
    require(images or asked is None, where,
            "augment=true, but the training batches hold no images ([N, C, H, W] floats, positional or "
            "pixel_values); drop augment")  # fmt: skip
    return images and n < AUGMENT_BELOW if asked is None else True


def few_images(data: Any) -> int:
    """How many images ``data`` holds when they are a few photos (fewer than ``AUGMENT_BELOW``), else 0:
    the one rule behind augmentation, frozen BatchNorm in training, and elastic.nest's full widths."""
    n = image_count(data, AUGMENT_BELOW) if data is not None else 0
    return n if n < AUGMENT_BELOW else 0


def image_count(data: Any, stop_at: int | None = None) -> int:
    """Images in one pass over ``data`` (0 when its first batch holds none), counted up to the first
    batch that is not images, or until ``stop_at`` is reached."""
    from .batches import epoch_batches

    n = 0
    for raw in epoch_batches(data, 0, 0):
        found = image_tensor(as_batch(raw))
        if found is None:
            break
        n += int(found[1].shape[0])
        if stop_at is not None and n >= stop_at:
            break
    return n
