"""Hugging Face families the op rules must prune (issue 10): CNNs (grouped convs, layer scale,
depthwise/inverted residuals, squeeze-excite), GPT-2's Conv1D with its fused QKV split, Swin's
relative position bias and DeBERTa's disentangled attention. Tiny random configs; each prunes
exactly (student == teacher with the dropped units zeroed) and loses at least 20 % of its MACs
when half of every exact group is dropped."""

from __future__ import annotations

import os
import random

import pytest
import torch
from potstill.inputs.data import primary_output
from potstill.ir.capture import analyze
from potstill.ir.surgery import masked_reference, prune_width

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

T = transformers
IMAGE = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))

FAMILIES = {
    "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=3)),
    "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)),
    "regnet": lambda: T.RegNetForImageClassification(T.RegNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=3)),
    "mobilenet_v2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        depth_multiplier=0.25, image_size=32, num_labels=3)),
    "efficientnet": lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(
        width_coefficient=0.25, depth_coefficient=0.2, image_size=32, num_labels=3, hidden_dim=320)),
    "gpt2": lambda: T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                             use_cache=False)),
    "swin": lambda: T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=3)),
    "deberta_v2": lambda: T.DebertaV2Model(T.DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=8)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_family_prunes_exactly(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    inputs = (IDS,) if family in ("gpt2", "deberta_v2") else (IMAGE,)
    a = analyze(model, inputs)
    assert a.unknown_ops == {} or family == "gpt2"  # GPT-2's mask code runs under vmap (pinned, no channels)
    assert not [g.pinned for g in a.groups if g.pinned and "config" in g.pinned]
    rng = random.Random(0)
    keep = {g.id: sorted(rng.sample(range(g.n_units), max(1, g.n_units // 2))) for g in a.prunable() if g.exact}
    student = prune_width(model, a, keep)
    reference = masked_reference(model, a, keep)
    with torch.no_grad():
        out_s, out_r = primary_output(student(*inputs)), primary_output(reference(*inputs))
    torch.testing.assert_close(out_s, out_r, atol=1e-4 * max(1.0, out_r.abs().max().item()), rtol=1e-4)
    assert analyze(student, inputs).cost.macs <= 0.8 * a.cost.macs
