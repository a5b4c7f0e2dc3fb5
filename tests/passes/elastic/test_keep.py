"""A finalist ships with the trained weights or the weights before training, whichever is more
faithful on the held-out batches: a training that damages the weights is rejected per subnet and
the record says so; a training that helps is kept."""

from __future__ import annotations

import copy

import pytest
import torch
from potstill.inputs.data import as_batch
from potstill.passes.elastic import extract, make_supernet, recalibrate_bn
from potstill.passes.elastic.keep import settle_weights
from potstill.passes.elastic.score import Scorer, Source
from potstill.passes.elastic.search import Finalist
from potstill.pipeline import PassManager, build_pipeline
from potstill.profiles import load_profile
from potstill.state import CompileState
from torch import nn

G = torch.Generator().manual_seed(3)
X = torch.randn(96, 32, generator=G)


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


def _supernet(teacher: nn.Module):
    return make_supernet(copy.deepcopy(teacher), (X[:1],), width_ratios=[0.5, 1.0], expansion_ratios=[0.5, 1.0],
                         depth=False)


def _damage(tensors, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 3 * t.abs().mean())


def _finalists(net, scorer: Scorer) -> list[Finalist]:
    out = []
    for i, cfg in enumerate((net.space.smallest(), net.space.largest())):
        recalibrate_bn(net, cfg, scorer.calib)
        module = extract(net, cfg).module
        out.append(Finalist(cfg, module, scorer(cfg), 1.0, 1.0, 1.0, 1.0, i, artifact="engine"))
    return out


@pytest.mark.parametrize("damaged", ["trained", "untrained"])
def test_the_more_faithful_weights_ship_per_subnet(damaged: str) -> None:
    teacher = _teacher()
    net = _supernet(teacher)
    net.keep_untrained()
    # "training" that damages the weights, or (the other case) weights before training that were worse
    _damage(net.model.parameters() if damaged == "trained" else net.untrained.values(), seed=1)
    trained_state = {k: v.clone() for k, v in net.model.state_dict().items()}
    scorer = Scorer(net, teacher, [as_batch(X[64:])], [as_batch(X[:64])])
    finalists = _finalists(net, scorer)
    trained_modules = [f.module for f in finalists]
    settle_weights(finalists, scorer, scorer.calib)
    kept = "untrained" if damaged == "trained" else "trained"
    for f, trained_module in zip(finalists, trained_modules):
        check = f.weights_check
        assert check is not None and check["kept"] == kept, check
        other = "trained" if kept == "untrained" else "untrained"
        assert check[kept] > check[other] and f.accuracy == check[kept]
        assert (f.module is trained_module) == (kept == "trained")
        assert f.artifact == ("engine" if kept == "trained" else None)  # an engine of other weights is dropped
        assert f.to_dict()["weights_check"] == check
    # whichever weights are undamaged are the nested teacher's: the largest subnet shipped computes the teacher
    with torch.no_grad():
        torch.testing.assert_close(finalists[1].module(X[64:]), teacher(X[64:]), rtol=1e-5, atol=1e-5)
    # the supernet keeps its trained weights, and the kept copy is untouched by the check
    for k, v in net.model.state_dict().items():
        torch.testing.assert_close(v, trained_state[k])


def test_an_untrained_supernet_is_not_checked() -> None:
    teacher = _teacher()
    net = _supernet(teacher)
    scorer = Scorer(net, teacher, [as_batch(X[64:])], [as_batch(X[:64])])
    finalists = _finalists(net, scorer)
    settle_weights(finalists, scorer, scorer.calib)
    assert all(f.weights_check is None and "weights_check" not in f.to_dict() for f in finalists)


def test_untrained_weights_restore_the_trained_ones_after_an_error() -> None:
    net = _supernet(_teacher())
    net.keep_untrained()
    _damage(net.model.parameters(), seed=2)
    trained = {k: v.clone() for k, v in net.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"), net.untrained_weights():
        assert torch.equal(net.model[0].weight, net.untrained["0.weight"])
        raise RuntimeError("inside")
    for k, v in net.model.state_dict().items():
        assert torch.equal(v, trained[k])


def test_the_passes_reject_a_damaging_training_and_say_so(capsys, monkeypatch) -> None:
    """Through nest -> train -> search with a training that damages the weights: every emitted
    student ships with the weights before training, its record and history say so, and so does the
    console."""
    import potstill.passes.elastic.train as train_module

    real = train_module.train_supernet

    def damaging(net, *args, **kwargs):
        result = real(net, *args, **kwargs)
        with torch.no_grad():  # the head negated: every subnet's top-1 becomes its bottom-1
            for p in net.model[2].parameters():
                p.neg_()
        return result

    monkeypatch.setattr(train_module, "train_supernet", damaging)
    teacher = _teacher()
    y = teacher(X).argmax(-1).detach()
    state = CompileState(
        teacher, (X[:1],), profile=load_profile("cpu"),
        calib_data=lambda: [X[:32], X[32:64]], heldout_data=lambda: [X[64:]],
        train_data=lambda: [(X[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)],
    )
    spec = "elastic.nest{depth=false},elastic.train{max_steps=2,random_subnets=0},"
    spec += "elastic.search{students=2,population=4,generations=1,extra_tries=0}"
    PassManager(build_pipeline(spec)).run(state)
    assert state.students
    for s in state.students:
        check = s.metrics["elastic"]["weights_check"]
        assert check["kept"] == "untrained" and check["untrained"] > check["trained"], check
        assert s.metrics["elastic"]["accuracy"] == check["untrained"]
        assert any("training rejected" in h for h in s.history)
    console = " ".join(capsys.readouterr().err.split())  # rich wraps the line
    assert f"{state.students[0].name}: the supernet's training lowered" in console
    assert "ships with the weights before training" in console
    # the search itself ranked with the weights before training, and said so
    # (named without statistics: the model has no BatchNorm)
    assert state.students[0].metrics["elastic"]["search_timing"]["scored_with"] == ["untrained weights"]
    assert "most faithful on held-out data with untrained weights, so" in console


@pytest.mark.parametrize("damaged", ["trained", "untrained", "neither"])
def test_the_search_scores_each_subnet_with_the_weights_that_serve_it(damaged: str) -> None:
    """A training that damaged every subnet is not what the search ranks by: it scores with the
    weights before training (on a pretrained teacher the front had collapsed to the smallest subnet);
    where the weights before training are the damaged ones, or nothing was kept, the trained weights."""
    teacher = _teacher()
    net = _supernet(teacher)
    if damaged != "neither":
        net.keep_untrained()
        assert net.untrained is not None
        _damage(net.model.parameters() if damaged == "trained" else net.untrained.values(), seed=1)
    scorer = Scorer(net, teacher, [as_batch(X[64:])], [as_batch(X[:64])])
    largest = net.space.largest()
    with_trained = scorer._score(largest)
    score = scorer(largest)
    if damaged == "neither":
        assert scorer.sources == (Source(),) and score == with_trained
        return
    with net.untrained_weights():
        with_untrained = scorer._score(largest)
    assert scorer.sources == (Source("untrained" if damaged == "trained" else "trained"),)
    assert score == max(with_trained, with_untrained) and with_trained != with_untrained


def _bn_teacher() -> tuple[nn.Module, torch.Tensor]:
    """A small CNN whose BatchNorm statistics were estimated on the distribution it is scored on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    images = torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(images)
        head = model[-1]  # logits that vary with the image: a top-1 that the statistics can change
        head.bias.zero_()
        head.weight.mul_(10)
    return model.eval(), images


@pytest.mark.parametrize("stored", ["right", "wrong"])
def test_batchnorm_statistics_are_re_estimated_only_where_that_is_more_faithful(stored: str) -> None:
    """A pretrained teacher's statistics beat ones re-estimated on a few unrepresentative samples (the
    EfficientNet-Lite0 front had collapsed for this); statistics that no longer fit the weights (a
    supernet trained from scratch) are re-estimated."""
    teacher, images = _bn_teacher()
    net = make_supernet(copy.deepcopy(teacher), (images[:1],), width_ratios=[0.5, 1.0], expansion_ratios=[0.5, 1.0],
                        depth=False)
    heldout = [as_batch(images[32:])]
    if stored == "right":
        # two samples, each channel scaled and shifted: their statistics misdescribe the data
        calib = [as_batch(images[:2] * torch.tensor([5.0, 0.1, 1.0]).view(1, 3, 1, 1)
                          + torch.tensor([3.0, -2.0, 0.0]).view(1, 3, 1, 1))]
    else:
        calib = [as_batch(images[:16]), as_batch(images[16:32])]
        with torch.no_grad():  # statistics that no longer describe what reaches the layers
            for m in net.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.add_(3.0)
                    m.running_var.mul_(50.0)
    scorer = Scorer(net, teacher, heldout, calib)
    largest = net.space.largest()
    score = scorer(largest)
    want = Source("trained", "stored" if stored == "right" else "recalibrated")
    other = Source("trained", "recalibrated" if stored == "right" else "stored")
    assert want in (scorer.sources or ()), scorer.sources
    if stored == "wrong":
        assert scorer.sources == (want,)
    assert score == max(scorer._score(largest, s) for s in scorer.candidates())
    finalists = [Finalist(largest, extract(net, largest).module, scorer(largest), 1.0, 1.0, 1.0, 1.0, 0)]
    recalibrate_bn(net, largest, calib)  # as the search's timing leaves the supernet
    finalists[0].module = extract(net, largest).module
    settle_weights(finalists, scorer, calib)
    check = finalists[0].weights_check
    assert check is not None and check["statistics"] == want.stats, check
    assert check["scores"][want.label()] > check["scores"][other.label()]
    if stored == "right":  # the largest subnet with the stored statistics is the teacher
        with torch.no_grad():
            torch.testing.assert_close(finalists[0].module(images[32:]), teacher(images[32:]), rtol=1e-5, atol=1e-5)
