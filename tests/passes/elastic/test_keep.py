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
from potstill.passes.elastic.score import Scorer
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
    settle_weights(net, finalists, scorer.score_module, scorer.calib)
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
    settle_weights(net, finalists, scorer.score_module, scorer.calib)
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
        assert scorer.weights is None and score == with_trained
        return
    with net.untrained_weights():
        with_untrained = scorer._score(largest)
    assert scorer.weights == ("untrained" if damaged == "trained" else "trained")
    assert score == max(with_trained, with_untrained) and with_trained != with_untrained
