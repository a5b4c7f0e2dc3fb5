"""Image augmentation for distilling on a few photos: new views of the same shape, seeded, and on by
default only for a few images."""

from __future__ import annotations

import pytest
import torch
from potstill.errors import InputError, PotstillError
from potstill.passes.distill import TensorBatches
from potstill.passes.distill.augment import Augment, AugmentedImages
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState, Student
from torch import nn


def _images(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # smooth images with structure (a crop of one differs from another crop of it)
    base = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear", align_corners=False)


def test_augmentation_gives_different_crops_of_the_same_shape() -> None:
    x = _images()
    g = torch.Generator().manual_seed(1)
    a, b = Augment()(x, g), Augment()(x, g)
    assert a.shape == b.shape == x.shape and a.dtype == x.dtype
    assert torch.isfinite(a).all()
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image got a new view
    assert (a - x).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_augmentation_with_nothing_to_vary_is_the_identity() -> None:
    x = _images()
    still = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, brightness=0.0, contrast=0.0, saturation=0.0)
    torch.testing.assert_close(still(x, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0)


def test_a_flip_alone_mirrors_the_image() -> None:
    x = _images()
    flip = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0, brightness=0.0, contrast=0.0, saturation=0.0)
    torch.testing.assert_close(flip(x, torch.Generator().manual_seed(0)), x.flip(-1), atol=1e-5, rtol=0)


def test_views_depend_on_seed_and_epoch_only() -> None:
    x = _images()
    src = AugmentedImages(lambda: iter([x[:3], x[3:]]), seed=5)
    e0, again, e1 = list(src(0)), list(src(0)), list(src(1))
    assert [b.args[0].shape for b in e0] == [(3, 3, 32, 32), (3, 3, 32, 32)]
    torch.testing.assert_close(e0[0].args[0], again[0].args[0], rtol=0, atol=0)  # a resumed run sees the same views
    assert not torch.allclose(e0[0].args[0], e1[0].args[0])  # each epoch new ones


def _conv(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 4)).eval()  # fmt: skip


def _distill(spec: str, x: torch.Tensor) -> dict:
    state = CompileState(_conv(0, 8), (x[:1],), out_dir=None, train_data=TensorBatches(x, batch_size=3))
    state.students.append(Student("s", _conv(1, 4)))
    PassManager(build_pipeline(f"distill{{epochs=1,progress=false{spec}}}")).run(state)
    return state.working().metrics["distill"]


def test_few_photos_are_augmented_by_default_and_augment_false_turns_it_off() -> None:
    x = _images()
    assert _distill("", x)["augment"] is True
    assert _distill(",augment=false", x)["augment"] is False
    assert _distill(",teacher_outputs=cached", x)["augment"] is False  # a cache cannot hold new views


def test_augment_true_where_it_cannot_apply_is_an_error() -> None:
    with pytest.raises(InputError, match="augment=true needs teacher_outputs=live"):
        build_pipeline("distill{augment=true,teacher_outputs=cached}")
    state = CompileState(nn.Linear(8, 2), (torch.zeros(1, 8),), out_dir=None,
                         train_data=TensorBatches(torch.randn(12, 8), batch_size=4))  # fmt: skip
    state.students.append(Student("s", nn.Linear(8, 2)))
    with pytest.raises(PotstillError, match="hold no images"):
        PassManager(build_pipeline("distill{augment=true,progress=false}")).run(state)


def test_few_photos_train_with_frozen_batchnorm_by_default() -> None:
    """A few photos keep the student's BatchNorm statistics (the teacher's, in a pruned student) as they
    are; batchnorm=train asks for batch statistics. Dropout is off unless asked for."""
    x = _images()
    default = _distill("", x)
    assert default["batchnorm"] == "frozen" and default["dropout"] is False
    asked = _distill(",batchnorm=train,dropout=true", x)
    assert asked["batchnorm"] == "train" and asked["dropout"] is True
    with pytest.raises(InputError, match="batchnorm must be train or frozen"):
        build_pipeline("distill{batchnorm=eval}")
