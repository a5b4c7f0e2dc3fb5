"""Nesting keeps the full network's output; every configuration run in the supernet equals the
subnet extracted from it; extraction is fast and leaves the supernet untouched."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from potstill.inputs.data import as_batch, primary_output
from potstill.ir.capture import analyze
from potstill.passes.elastic import extract, make_supernet, permute_group
from potstill.passes.elastic.space import SubnetConfig

from .conftest import tiny_bert, tiny_llama

X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _out(model, args, kwargs):
    with torch.no_grad():
        return primary_output(model(*args, **kwargs)).clone()


def _check_supernet(model, args, kwargs, batches=None, n_random=3):
    reference = _out(model, args, kwargs)
    analysis = analyze(model, args, kwargs)
    gen = np.random.default_rng(0)
    # random scores: the permutation is far from the identity, so a member left out would show
    scores = {g.id: gen.random(g.n_units) for g in analysis.prunable()}
    net = make_supernet(model, args, kwargs, scores=scores, batches=batches, analysis=analysis)
    assert net.space.width_dims, "nothing elastic"
    permuted = [g for g, order in net.record.orders.items() if order != sorted(order)]
    assert permuted
    torch.testing.assert_close(_out(model, args, kwargs), reference, atol=1e-5, rtol=1e-5)
    # the most important unit of every group is now unit 0
    for d in net.space.width_dims:
        assert net.record.orders[d.group][0] == int(np.argmax(scores[d.group]))
    rng = random.Random(0)
    configs = [net.space.smallest(), *(net.space.sample(rng) for _ in range(n_random))]
    for cfg in configs:
        with net.configured(cfg):
            inside = _out(model, args, kwargs)
        ex = extract(net, cfg)
        torch.testing.assert_close(_out(ex.module, args, kwargs), inside, atol=1e-5, rtol=1e-5)
        assert sum(p.numel() for p in ex.module.parameters()) <= sum(p.numel() for p in model.parameters())
    small = extract(net, net.space.smallest()).module
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # hooks are gone outside `configured`: the supernet is the full network again
    torch.testing.assert_close(_out(model, args, kwargs), reference, atol=1e-5, rtol=1e-5)
    return net


def test_cnn_nesting_keeps_output_and_extraction_matches_the_supernet(cnn) -> None:
    net = _check_supernet(cnn, (X,), {}, batches=[X])
    kinds = {d.kind for d in net.space.dims()}
    assert kinds == {"width", "expansion", "depth"}
    (depth,) = net.space.depth_dims
    assert depth.container == "stage" and len(depth.order) == 3
    # the smallest subnet keeps one block and the narrowest stage width
    small = extract(net, net.space.smallest()).module
    assert len(small.stage) == 1
    assert small.head.in_features == min(net.space.width_dims[0].choices)


def test_bert_nesting_keeps_output_and_extraction_matches_the_supernet() -> None:
    model, kw = tiny_bert()
    net = _check_supernet(model, (), kw, batches=[kw])
    kinds = {net.analysis.groups[d.group].kind for d in net.space.width_dims}
    assert {"heads", "neurons", "hidden"} <= kinds
    small = extract(net, net.space.smallest()).module
    assert small.config.num_hidden_layers == 1


def test_llama_gqa_nesting_keeps_output_and_extraction_matches_the_supernet() -> None:
    model, kw = tiny_llama()
    net = _check_supernet(model, (), kw, batches=[kw])
    kinds = {net.analysis.groups[d.group].kind for d in net.space.width_dims}
    assert {"kv_heads", "neurons", "hidden"} <= kinds
    small = extract(net, net.space.smallest()).module
    attn = small.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * attn.k_proj.out_features  # GQA ratio kept: whole KV groups


def test_permuting_a_group_back_restores_the_weights(cnn) -> None:
    a = analyze(cnn, (X,))
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    g = a.prunable()[0]
    order = list(reversed(range(g.n_units)))
    permute_group(cnn, g, order)
    changed = [k for k, v in cnn.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    permute_group(cnn, g, order)  # a reversal is its own inverse
    for k, v in cnn.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="permutation"):
        permute_group(cnn, g, [0] * g.n_units)


def test_configuration_outside_the_space_is_an_error(cnn) -> None:
    from potstill.errors import InputError

    net = make_supernet(cnn, (X,))
    d = net.space.width_dims[0]
    bad = SubnetConfig(((d.group, d.choices[0] + 1),))
    with pytest.raises(InputError, match="not a choice"):
        extract(net, bad)
    with pytest.raises(InputError, match="not a choice"), net.configured(bad):
        pass


def test_an_extracted_subnet_owns_its_batchnorm_statistics(cnn) -> None:
    """Recalibrating the supernet for the next configuration must not rewrite an earlier student's
    statistics (the surgery shares unsliced tensors with its source)."""
    from potstill.passes.elastic import recalibrate_bn

    net = make_supernet(cnn, (X,), batches=[X])
    space = net.space
    # full width in the first group: its BatchNorm is not sliced, so it would be shared
    first = space.config([len(d.choices) - 1 if i == 0 else 0 for i, d in enumerate(space.dims())])
    recalibrate_bn(net, first, [X])
    student = extract(net, first).module
    before = _out(student, (X,), {})
    recalibrate_bn(net, space.largest(), [X * 3 + 1])  # other statistics
    torch.testing.assert_close(_out(student, (X,), {}), before)


class _Scaled(torch.nn.Module):
    """``x + a · tanh(W x) ⊙ m``: a residual block whose branch weighs ``a`` and writes the channels
    ``m`` selects; every block and the head read channels 0..7 only."""

    def __init__(self, a: float, seed: int, write_hidden: bool = False) -> None:
        super().__init__()
        self.a = a
        self.lin = torch.nn.Linear(16, 16)
        torch.nn.init.normal_(self.lin.weight, std=1.0, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            self.lin.weight[:, 8:] = 0
        mask = torch.zeros(16)
        mask[8:] = 1.0
        self.register_buffer("m", mask if write_hidden else 1 - mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.a * torch.tanh(self.lin(x)) * self.m


class _Stack(torch.nn.Module):
    def __init__(self, weights: list[float], hidden_writer: int | None = None) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(*(_Scaled(a, i, i == hidden_writer) for i, a in enumerate(weights)))
        self.head = torch.nn.Linear(16, 10)
        with torch.no_grad():
            self.head.weight[:, 8:] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def test_depth_keeps_the_blocks_whose_removal_costs_the_most_fidelity() -> None:
    """Branches weighing 3, 0.1, 1 and 0.5, where the first writes channels nothing reads: it moves
    the hidden state most (Block Importance would keep it first) and the output not at all, so it
    is the first dropped; the rest rank by weight."""
    from potstill.passes.elastic.nest import greedy_block_order
    from potstill.passes.importance.blocks import block_influence

    torch.manual_seed(0)
    model = _Stack([3.0, 0.1, 1.0, 0.5], hidden_writer=0).eval()
    names = [f"blocks.{i}" for i in range(4)]
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        reference = model(batches[0])
    bi = block_influence(model, names, [as_batch(b) for b in batches])
    assert max(bi, key=bi.__getitem__) == "blocks.0"  # the case Block Importance gets wrong
    order = greedy_block_order(model, names, batches)
    assert order == ["blocks.2", "blocks.3", "blocks.1", "blocks.0"]
    # through make_supernet: depth d keeps the first d of that order
    net = make_supernet(model, (batches[0],), {}, batches=batches)
    (depth,) = net.space.depth_dims
    assert list(depth.order) == order
    # ranking runs the model with blocks skipped: afterwards it computes what it did
    torch.testing.assert_close(model(batches[0]), reference)


def test_fidelity_to_cached_outputs_equals_fidelity_to_the_module() -> None:
    from potstill.fidelity import measure_fidelity

    torch.manual_seed(0)
    teacher, student = _Stack([1.0, 1.0]).eval(), _Stack([1.0, 0.5]).eval()
    batches = [torch.randn(16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        cached = [teacher(b) for b in batches]
    live = measure_fidelity(teacher, student, batches)
    assert 0 < live.score < 1
    assert measure_fidelity(cached, student, batches).score == pytest.approx(live.score)


def test_nesting_importance_is_chosen_on_held_out_data() -> None:
    """Hidden units with the largest weights that the data never activates: magnitude nests them
    first, and its half-width probe loses the teacher; a data-driven estimator nests the live units
    first and is chosen, and the record holds every estimator's probe fidelity."""
    from potstill.passes.elastic.build import NEST_ESTIMATORS, choose_scores

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[0].weight[:16].mul_(8)  # half the units: large weights, a bias that keeps them off on the data
        model[0].bias[:16] = -1e3
        model[0].bias[16:] = 0.0
    teacher = copy.deepcopy(model)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(2))
    args = (x[:1],)
    scores, record = choose_scores(model, teacher, args, None, [x[:128]], [as_batch(x[128:])],
                                   width_ratios=(0.25, 0.5, 1.0), expansion_ratios=(0.25, 0.5, 1.0), multiple=1,
                                   analysis=analyze(model, args, {}))
    fid = record["probe_fidelity"]
    assert record["chosen"] != "magnitude" and fid[record["chosen"]] > fid["magnitude"] + 0.1, record
    assert set(fid) == set(NEST_ESTIMATORS) >= {"magnitude", "fisher", "activation", "obs"}
    (group,) = [g for g, s in scores.items() if len(s) == 32]
    assert np.argsort(-np.asarray(scores[group]))[:16].min() >= 16  # the live units come first
