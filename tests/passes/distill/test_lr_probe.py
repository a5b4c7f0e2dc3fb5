"""The lr probe: candidate learning rates trained briefly from one start, the held-out loss picks one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from potstill.errors import InputError
from potstill.passes.distill import DistillTrainer, TensorBatches, TrainConfig, make_loss
from potstill.passes.distill.defaults import default_distill_options
from potstill.passes.distill.lr_probe import probe_lr, probe_steps
from potstill.passes.prune.heldout import HeldoutReference, as_batches
from potstill.pipeline import PassManager, build_pipeline
from potstill.state import CompileState, Student

from .conftest import mlp

#: sgd at lr 50 without clipping blows the tiny student's weights up within a few steps
WILD = "optimizer=sgd,grad_clip=null,divergence_factor=null"


def _state(teacher_data, heldout: bool = True) -> CompileState:
    teacher, x, _ = teacher_data
    state = CompileState(teacher, (x[:2],), out_dir=None, train_data=TensorBatches(x[:384], batch_size=32))
    state.heldout_data = (lambda: iter([x[448:]])) if heldout else None
    state.students.append(Student("narrow", mlp(8, 16, 5, seed=3)))
    return state


def _distill(state: CompileState, options: str) -> dict:
    PassManager(build_pipeline(f"distill{{progress=false,{options}}}")).run(state)
    return state.working().metrics["distill"]


@pytest.mark.parametrize("candidates", ["[50,0.01]", "[0.01,50]"])
def test_the_probe_picks_the_rate_that_lowers_the_heldout_loss(teacher_data, candidates: str) -> None:
    """One candidate is destructive, wherever it stands in the list: the probe picks the other, and
    the run goes on at it from the probe's state and lowers the held-out loss further."""
    state = _state(teacher_data)
    start = state.working().module[0].weight.clone()
    m = _distill(state, f"lr_probe={candidates},epochs=2,{WILD}")
    probe = m["lr_probe"]
    assert probe["chosen"] == m["lr"] == 0.01
    losses = probe["heldout_losses"]
    assert set(losses) == {"50", "0.01"} and losses["0.01"] < probe["loss_before"] < losses["50"]
    # 24 planned steps, two candidates: 6 probe steps each; the winner's 6 count, 18 more follow
    assert probe["steps"] == 6 and m["steps"] == m["planned_steps"] == 24
    h = m["heldout"]
    assert h["kept"] and h["loss_after"] < losses["0.01"] < h["loss_before"]
    assert not torch.equal(state.working().module[0].weight, start)


def test_a_given_lr_skips_the_probe(teacher_data) -> None:
    m = _distill(_state(teacher_data), "lr=0.01,epochs=2")
    assert m["lr"] == 0.01 and "lr_probe" not in m and m["steps"] == 24
    # the default pipeline probes a pretrained teacher's lr unless the recipe's train: gives one
    assert default_distill_options("embedding", epochs=3, minutes=None, images=False)["lr_probe"] == (2e-4, 5e-5, 1.25e-5)
    given = default_distill_options("embedding", epochs=3, minutes=None, images=False, given={"lr"})
    assert "lr_probe" not in given and "lr" not in given
    with pytest.raises(InputError, match="both given"):
        build_pipeline("distill{lr=0.01,lr_probe=[0.1,0.01]}")
    with pytest.raises(InputError, match="applies to lr_probe only"):
        build_pipeline("distill{probe_steps=3}")
    with pytest.raises(InputError, match="two or more"):
        build_pipeline("distill{lr_probe=[0.1]}")


def test_without_heldout_batches_the_first_candidate_trains_and_the_record_says_why(teacher_data) -> None:
    m = _distill(_state(teacher_data, heldout=False), f"lr_probe=[0.01,50],epochs=2,{WILD}")
    assert m["lr"] == 0.01 and "held-out" in m["lr_probe"]["skipped"] and m["steps"] == 24


def test_the_winner_goes_on_from_its_weights_and_optimizer_state(teacher_data) -> None:
    """probe_lr leaves the student at the winner's weights; the next run starts from its AdamW moments."""
    teacher, x, _ = teacher_data
    student = mlp(8, 16, 5, seed=3)
    data = TensorBatches(x[:384], batch_size=32)
    reference = HeldoutReference.of(teacher, as_batches([x[448:]]))
    config = TrainConfig(epochs=1, lr=1e-3, progress=False, seed=0)

    def make(loss, cfg: TrainConfig) -> DistillTrainer:
        return DistillTrainer(student, teacher, loss, cfg)

    loss = make_loss("kd")
    n = probe_steps(2, 12, steps=40)
    probed = probe_lr(student, loss, data, config, (1e-2, 1e-4), reference.loss, make, steps=n)
    assert n == 3 and probed.steps == 3 and probed.lr == 1e-2 and probed.losses[1e-2] < probed.losses[1e-4]
    assert reference.loss(student) == pytest.approx(probed.losses[1e-2], rel=0, abs=0)
    moments = probed.optimizer_state
    assert moments is not None and int(moments["state"][0]["step"]) == 3
    trainer = make(probed.loss, dataclasses.replace(config, lr=probed.lr, max_steps=2))
    trainer.start_optimizer_state = moments
    trainer.fit(data)
    assert int(trainer.optimizer.state_dict()["state"][0]["step"]) == 5  # 3 probe steps + 2


def test_when_every_rate_makes_it_worse_the_probe_goes_down_the_ladder(teacher_data) -> None:
    """Both candidates blow AdamW up: the probe tries a quarter of the smaller, then a quarter of that,
    and stops at the first rung that lowers the held-out loss; a candidate that already lowers it
    gets no rung below it."""
    teacher, x, _ = teacher_data
    data = TensorBatches(x[:384], batch_size=32)
    reference = HeldoutReference.of(teacher, as_batches([x[448:]]))
    config = TrainConfig(epochs=1, lr=1e-3, progress=False, seed=0)

    def probe(candidates: tuple[float, ...]):
        student = mlp(8, 16, 5, seed=3)
        return probe_lr(student, make_loss("kd"), data, config, candidates, reference.loss,
                        lambda loss, cfg: DistillTrainer(student, teacher, loss, cfg), steps=3)

    down = probe((16.0, 4.0))
    assert list(down.losses) == [16.0, 4.0, 1.0, 0.25]
    assert down.losses[4.0] == down.losses[1.0] == float("inf")  # the first rung down still diverges
    assert down.lr == 0.25 and down.losses[0.25] < down.loss_before
    assert list(probe((1.0, 0.25)).losses) == [1.0, 0.25]  # 0.25 lowers the loss: no rung below
