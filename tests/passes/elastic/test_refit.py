"""Each finalist's consumers of the elastic widths are refitted by least squares toward the nested
teacher, across dropped blocks, and the refit ships only where it raises held-out fidelity."""

from __future__ import annotations

import copy

import torch
from potstill.inputs.data import as_batch
from potstill.passes.elastic import extract, make_supernet
from potstill.passes.elastic.refit import block_renamer, kept_blocks, refit_finalists
from potstill.passes.elastic.score import Scorer
from potstill.passes.elastic.search import Finalist
from potstill.passes.elastic.space import SubnetConfig
from torch import nn

from .conftest import TinyCNN, randomize_bn

X = torch.randn(320, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def _teacher_with_copies() -> TinyCNN:
    """Each block's second half of hidden channels repeats the first half, read at half the weight:
    the first half alone, refitted, computes exactly what the block computes."""
    torch.manual_seed(0)
    t = randomize_bn(TinyCNN())
    with torch.no_grad():
        for b in t.stage:
            h = b.conv1.out_channels // 2
            b.conv1.weight[h:] = b.conv1.weight[:h]
            for n in ("running_mean", "running_var", "weight", "bias"):
                getattr(b.bn1, n)[h:] = getattr(b.bn1, n)[:h]
            b.conv2.weight[:, h:] = 0.5 * b.conv2.weight[:, :h]
    return t


def _setup(teacher: nn.Module, metric=None):
    net = make_supernet(copy.deepcopy(teacher), (X[:1],), batches=[X[:64]])
    scorer = Scorer(net, teacher, [as_batch(X[256:])], [as_batch(X[i:i + 32]) for i in range(0, 256, 32)], metric)
    return net, scorer


def _half_hidden(net, depth: int) -> SubnetConfig:
    """Every block's hidden width at half, the residual width whole, ``depth`` blocks."""
    widths = tuple((d.group, d.choices[-1] // 2 if d.kind == "expansion" else d.choices[-1]) for d in net.space.width_dims)
    return SubnetConfig(widths, tuple((d.container, depth) for d in net.space.depth_dims))


def _finalist(net, scorer: Scorer, config: SubnetConfig) -> Finalist:
    module = extract(net, config).module
    return Finalist(config, module, scorer.score_module(module), 1.0, 1.0, 1.0, 1.0, 0, artifact="engine")


def test_the_refit_recovers_what_the_dropped_channels_computed() -> None:
    teacher = _teacher_with_copies()
    net, scorer = _setup(teacher)
    f = _finalist(net, scorer, _half_hidden(net, depth=3))
    before = f.module
    with torch.no_grad():
        err_before = float((before(X[256:]) - teacher(X[256:])).abs().max())
    refit_finalists([f], scorer, scorer.calib)
    assert f.refit is not None and f.refit["kept"] and f.refit["after"] > f.refit["before"]
    assert f.module is not before and f.artifact is None  # the shipped engine is rebuilt from the refit weights
    with torch.no_grad():
        err_after = float((f.module(X[256:]) - teacher(X[256:])).abs().max())
        scale = float(teacher(X[256:]).abs().max())
    assert err_after < 0.02 * scale < err_before, (err_before, err_after, scale)


def test_the_refit_reaches_across_dropped_blocks() -> None:
    """With a block dropped, the refit of the blocks after it reads the supernet's layers under their
    old numbers and absorbs the drift: held-out fidelity rises."""
    teacher = _teacher_with_copies()
    net, scorer = _setup(teacher)
    config = _half_hidden(net, depth=2)
    dropped = net.space.removed_blocks(config)
    assert len(dropped) == 1
    to_source, to_student = block_renamer(kept_blocks(net, config))
    index = int(dropped[0].rsplit(".", 1)[1])
    assert to_student(f"stage.{index}.conv2") is None
    for j, i in enumerate(k for k in range(3) if k != index):
        assert to_source(f"stage.{j}.conv2") == f"stage.{i}.conv2"
        assert to_student(f"stage.{i}.conv2") == f"stage.{j}.conv2"
    assert to_source("head") == "head" == to_student("head")
    f = _finalist(net, scorer, config)
    refit_finalists([f], scorer, scorer.calib)
    assert f.refit is not None and f.refit["kept"] and f.refit["after"] > f.refit["before"], f.refit


def test_a_refit_that_lowers_held_out_fidelity_does_not_ship() -> None:
    teacher = _teacher_with_copies()
    shipped: list[nn.Module] = []

    def metric(module: nn.Module) -> float:  # the user's metric prefers the module as extracted
        return 1.0 if module is shipped[0] else 0.5

    net, scorer = _setup(teacher, metric)
    config = _half_hidden(net, depth=3)
    shipped.append(extract(net, config).module)
    f = Finalist(config, shipped[0], scorer.score_module(shipped[0]), 1.0, 1.0, 1.0, 1.0, 0, artifact="engine")
    weights = {k: v.clone() for k, v in f.module.state_dict().items()}
    refit_finalists([f], scorer, scorer.calib)
    assert f.refit == {"before": 1.0, "after": 0.5, "kept": False, "layers": f.refit["layers"], "weights": "trained",
                       "scores": {"trained": 0.5}}  # never trained: the weights it has are the only base
    assert f.module is shipped[0] and f.artifact == "engine" and f.accuracy == 1.0
    assert all(torch.equal(v, f.module.state_dict()[k]) for k, v in weights.items())  # the refit worked on a copy


def test_a_finalist_trained_astray_ships_the_refit_of_the_weights_before_training() -> None:
    """Training that wrecked a subnet where no refit reaches: its refit from the trained weights
    cannot undo it, the refit from the weights before training recovers the teacher (the dropped
    channels are copies)."""
    teacher = _teacher_with_copies()
    net, scorer = _setup(teacher)
    net.keep_untrained()
    with torch.no_grad():  # "training" that ruined the stem, which no refit touches
        stem = net.model.stem[0].weight
        stem.copy_(torch.randn(stem.shape, generator=torch.Generator().manual_seed(3)))
    f = _finalist(net, scorer, _half_hidden(net, depth=3))
    f.weights_check = {"kept": "trained"}
    refit_finalists([f], scorer, scorer.calib)
    assert f.refit is not None and f.refit["kept"] and f.refit["weights"] == "untrained", f.refit
    assert f.refit["scores"]["untrained"] > f.refit["scores"]["trained"]
    with torch.no_grad():
        err = float((f.module(X[256:]) - teacher(X[256:])).abs().max())
        scale = float(teacher(X[256:]).abs().max())
    assert err < 0.02 * scale, (err, scale)


def test_the_norm_after_a_refitted_layer_normalises_with_the_teachers_statistics() -> None:
    """A finalist scored with re-estimated statistics: the layer is fitted to the teacher's output
    before its norm, so that norm gets the teacher's statistics back and the block computes what
    the teacher's does."""
    teacher = _teacher_with_copies()
    net, scorer = _setup(teacher)
    f = _finalist(net, scorer, _half_hidden(net, depth=3))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for b in f.module.stage:  # statistics as a few misleading samples would re-estimate them
            b.bn2.running_mean.add_(torch.randn(b.bn2.num_features, generator=g))
            b.bn2.running_var.mul_(3.0)
    f.accuracy = scorer.score_module(f.module)
    refit_finalists([f], scorer, scorer.calib)
    assert f.refit is not None and f.refit["kept"], f.refit
    with torch.no_grad():
        err = float((f.module(X[256:]) - teacher(X[256:])).abs().max())
        scale = float(teacher(X[256:]).abs().max())
        for b, t in zip(f.module.stage, teacher.stage):  # the channels in nested order
            assert torch.allclose(b.bn2.running_var.sort().values, t.bn2.running_var.sort().values)
    assert err < 0.02 * scale, (err, scale)


def test_a_transformer_is_refitted_one_block_at_a_time_across_a_dropped_layer(monkeypatch) -> None:
    """On a layer stack the refit captures block inputs once and runs the teacher's dropped layer
    beside the student's kept ones: the same weights as whole-model captures per layer."""
    import potstill.passes.prune.reconstruct as reconstruct_module
    from potstill.passes.elastic.refit import nested_teacher, refit_subnet

    from .conftest import tiny_bert

    teacher, kwargs = tiny_bert()
    ids = torch.randint(0, 100, (48, 8), generator=torch.Generator().manual_seed(1))
    batches = [as_batch({"input_ids": ids[i:i + 8], "attention_mask": torch.ones(8, 8, dtype=torch.long)})
               for i in range(0, 48, 8)]
    net = make_supernet(copy.deepcopy(teacher), (), kwargs, batches=batches[:2])
    scorer = Scorer(net, teacher, batches[4:], batches[:4])
    widths = tuple((d.group, d.choices[len(d.choices) // 2]) for d in net.space.width_dims)
    config = SubnetConfig(widths, tuple((d.container, d.choices[-1] - 1) for d in net.space.depth_dims))
    assert len(net.space.removed_blocks(config)) == 1
    reference = nested_teacher(scorer)
    layerwise, whole = extract(net, config).module, extract(net, config).module
    calls: list[str] = []
    real = reconstruct_module.reconstruct_layerwise
    monkeypatch.setattr(reconstruct_module, "reconstruct_layerwise",
                        lambda *a, **k: calls.append("layerwise") or real(*a, **k))
    assert refit_subnet(net, reference, layerwise, config, scorer.calib) > 0
    assert calls == ["layerwise"]
    monkeypatch.setattr(reconstruct_module, "layer_stack", lambda *a: None)  # forces whole-model captures
    refit_subnet(net, reference, whole, config, scorer.calib)
    assert calls == ["layerwise"]
    before = extract(net, config).module.state_dict()
    changed = 0
    for k, v in layerwise.state_dict().items():
        assert torch.allclose(v, whole.state_dict()[k], atol=1e-5), k
        changed += int(not torch.equal(v, before[k]))
    assert changed > 0
