from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from potstill.errors import InputError
from potstill.inputs.data import Batch
from potstill.passes.distill.capture import ModelOutputs
from potstill.passes.distill.losses import (
    AttentionLoss,
    CosineEmbeddingLoss,
    HiddenMSELoss,
    KDLoss,
    LossInputs,
    SumLoss,
    make_loss,
    uniform_layer_map,
    weighted_mean,
)


def _inputs(z_s: torch.Tensor, z_t: torch.Tensor | None, target: torch.Tensor | None = None, **kw) -> LossInputs:
    batch = Batch((torch.zeros(z_s.shape[0], 1),), kw.pop("kwargs", {}), target)
    t = None if z_t is None else ModelOutputs(None, z_t, **kw.pop("t", {}))
    return LossInputs(ModelOutputs(None, z_s, **kw.pop("s", {})), t, batch, **kw)


def test_kd_matches_hand_computed_value() -> None:
    z_s = torch.tensor([[1.0, 2.0, 0.5]])
    z_t = torch.tensor([[2.0, 0.0, 1.0]])
    t = 2.0
    p = [math.exp(v / t) for v in (2.0, 0.0, 1.0)]
    p = [v / sum(p) for v in p]
    q = [math.exp(v / t) for v in (1.0, 2.0, 0.5)]
    q = [v / sum(q) for v in q]
    expected = t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = KDLoss(temperature=t)(_inputs(z_s, z_t))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_alpha_mixes_hard_label_cross_entropy() -> None:
    z_s, z_t = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    kd = KDLoss(temperature=1.0, alpha=1.0)(_inputs(z_s, z_t, y))
    ce = F.cross_entropy(z_s, y)
    mixed = KDLoss(temperature=1.0, alpha=0.3)(_inputs(z_s, z_t, y))
    assert mixed.item() == pytest.approx(0.3 * kd.item() + 0.7 * ce.item(), rel=1e-6)
    with pytest.raises(InputError, match="labels"):
        KDLoss(alpha=0.5)(_inputs(z_s, z_t, None))


def test_kd_token_mask_ignores_padding() -> None:
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    masked = KDLoss()(_inputs(z_s, z_t, kwargs={"attention_mask": mask}))
    z_s2 = z_s.clone()
    z_s2[0, 2] += 100.0  # changes only padded positions
    z_s2[1, 1:] -= 50.0
    assert KDLoss()(_inputs(z_s2, z_t, kwargs={"attention_mask": mask})).item() == pytest.approx(masked.item())


def test_weighted_mean_divides_by_kept_positions() -> None:
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([0.0, 2.0, 0.0, 1.0])
    assert weighted_mean(v, sample_weight=w).item() == pytest.approx((2 * 2 + 4) / 2)


def test_uniform_layer_map_keeps_the_last_of_each_chunk() -> None:
    assert uniform_layer_map(3, 6) == {0: 1, 1: 3, 2: 5}
    assert uniform_layer_map(6, 6) == {i: i for i in range(6)}
    assert uniform_layer_map(2, 12) == {0: 5, 1: 11}


def test_hidden_mse_identity_projection_and_layer_map() -> None:
    g = torch.Generator().manual_seed(0)
    ht = [torch.randn(2, 5, 4, generator=g) for _ in range(4)]
    hs = [ht[1].clone(), ht[3].clone()]  # exactly the mapped teacher layers
    loss = HiddenMSELoss()
    inputs = _inputs(torch.zeros(2, 5, 4), torch.zeros(2, 5, 4), s={"hidden": hs}, t={"hidden": ht})
    assert loss(inputs).item() == pytest.approx(0.0, abs=1e-12)
    assert set(loss.projections) == {"0", "1"}
    off = HiddenMSELoss(layer_map={0: 0, 1: 3})(inputs)
    assert off.item() == pytest.approx(F.mse_loss(ht[1], ht[0]).item() / 2, rel=1e-5)
    with pytest.raises(InputError, match="out of range"):
        HiddenMSELoss(layer_map={0: 9})(inputs)


def test_attention_kl_is_zero_for_equal_maps_and_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(2, 3, 4, 4, generator=g), -1)
    b = torch.softmax(torch.randn(2, 3, 4, 4, generator=g), -1)
    same = _inputs(torch.zeros(2, 1), torch.zeros(2, 1), s={"attentions": [a]}, t={"attentions": [a]})
    diff = _inputs(torch.zeros(2, 1), torch.zeros(2, 1), s={"attentions": [b]}, t={"attentions": [a]})
    assert AttentionLoss("kl")(same).item() == pytest.approx(0.0, abs=1e-6)
    assert AttentionLoss("kl")(diff).item() > 0.01
    assert AttentionLoss("mse")(diff).item() == pytest.approx((a - b).pow(2).mean().item(), rel=1e-5)


def test_cosine_embedding_loss_mean_pools_over_the_mask() -> None:
    h = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    h2 = h.clone()
    h2[0, 2] = 99.0  # a padded position: ignored by mean pooling
    inputs = _inputs(h2, h, kwargs={"attention_mask": mask})
    assert CosineEmbeddingLoss()(inputs).item() == pytest.approx(0.0, abs=1e-6)


def test_make_loss_builds_sums_and_rejects_unknown_names_and_options() -> None:
    loss = make_loss("kd+hidden", temperature=3.0)
    assert isinstance(loss, SumLoss)
    assert loss.parts["kd"].temperature == 3.0  # type: ignore[union-attr]
    with pytest.raises(InputError, match="unknown distillation loss"):
        make_loss("nope")
    with pytest.raises(InputError, match="unknown option"):
        make_loss("kd", tempreature=2.0)
