"""Supernet training: the sandwich sampler, and a robust (RSLAD) supernet whose extracted subnets
keep at least twice the PGD-20 accuracy of a plain-KD supernet's."""

from __future__ import annotations

import copy

import pytest
import torch
from potstill.passes.distill import DistillTrainer, TensorBatches, TrainConfig
from potstill.passes.distill.robust import PGDConfig
from potstill.passes.elastic import make_supernet
from potstill.passes.elastic.train import SandwichSampler, evaluate_subnets, train_supernet
from torch import nn

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_sandwich_sampler_draws_per_step_and_unlocks_progressively(cnn) -> None:
    net = make_supernet(cnn, (X,), batches=[X])
    sampler = SandwichSampler(net, total_steps=30, random_subnets=2, seed=0)
    space = net.space
    assert sampler.unlocked(0) == ("width",)
    assert sampler.unlocked(15) == ("width", "depth")
    assert sampler.unlocked(29) == ("width", "depth", "expansion")
    first = sampler.configs(0)
    assert first[0] == space.largest() and len(first) == 4
    # phase 1: only width dims move; depth and expansion stay full
    for cfg in first[1:]:
        assert space.removed_blocks(cfg) == []
        for d in space.width_dims:
            if d.kind == "expansion":
                assert cfg.width(d.group) == d.choices[-1]
    assert first[1] == space.smallest(("width",))
    # a fresh draw every step, reproducible from (seed, step)
    late = [tuple(sampler.configs(s)[2:]) for s in range(20, 30)]
    assert len(set(late)) > 1
    assert sampler.configs(25) == SandwichSampler(net, 30, 2, seed=0).configs(25)
    assert sampler.configs(29)[1] == space.smallest()
    specs = sampler(3)
    assert [s.name for s in specs] == ["largest", "smallest", "random0", "random1"]
    # under a wall-clock budget the phases follow the fraction spent when it is ahead of the steps
    spent = [0.0]
    timed = SandwichSampler(net, total_steps=30_000, random_subnets=2, seed=0, spent=lambda: spent[0])
    assert timed.unlocked(3) == ("width",)
    spent[0] = 0.5
    assert timed.unlocked(3) == ("width", "depth")
    spent[0] = 1.0
    assert timed.unlocked(3) == ("width", "depth", "expansion") and timed.configs(3)[1] == space.smallest()


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def test_robust_supernet_subnets_keep_twice_the_robust_accuracy_of_plain_kd() -> None:
    x, y = _digits()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    teacher = _mlp(0)
    DistillTrainer(teacher, None, "kd", TrainConfig(epochs=10, lr=3e-3, progress=False), alpha=0.0).fit(
        TensorBatches(x[tr], y[tr], batch_size=64))
    teacher.eval()
    test = TensorBatches(x[te], y[te], batch_size=400, shuffle=False)
    pgd20 = PGDConfig(eps=0.2, step_size=0.05, steps=20)
    results = {}
    for method, options in {"kd": {}, "rslad": {"eps": 0.2, "step_size": 0.05, "steps": 5}}.items():
        net = make_supernet(copy.deepcopy(teacher), (x[:2],))
        train_supernet(net, teacher, TensorBatches(x[tr], y[tr], batch_size=64),
                       TrainConfig(epochs=8, lr=3e-3, progress=False, seed=0), loss=method, **options)
        configs = [net.space.smallest(), net.space.largest()]
        results[method] = evaluate_subnets(net, configs, test, [x[tr][:256]], pgd=pgd20)
    for kd, robust in zip(results["kd"], results["rslad"]):
        assert kd["params"] == robust["params"]
        assert kd["clean_accuracy"] > 0.85 and robust["clean_accuracy"] > 0.8, results
        assert robust["robust_accuracy"] >= 2 * kd["robust_accuracy"], results
        assert robust["robust_accuracy"] > 0.2, results
