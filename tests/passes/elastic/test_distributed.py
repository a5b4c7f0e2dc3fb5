"""Supernet training scales out and survives interruption: two gloo ranks under torchrun stay in
lock-step (the sandwich draws are the same on every rank), and a run stopped mid-way resumes from
DistillTrainer's checkpoint to the weights of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.torchrun import run_two_ranks

from . import ddp_worker

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_gloo_ranks_train_the_same_supernet(tmp_path: Path) -> None:
    run_two_ranks(HERE / "ddp_worker.py", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == 2
    _, initial, _ = ddp_worker.build()
    for key, value in ranks[0]["state"].items():
        # gradients were averaged across ranks: identical weights although each saw half of every batch
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0)
    assert not torch.allclose(ranks[0]["state"]["0.weight"], initial.state_dict()["0.weight"])
    assert (tmp_path / "ck").is_dir()
    # and the two ranks trained one supernet together: the same as one process on the whole batches
    # (two ranks each training alone on their halves would disagree with each other and with this)
    rows: list[int] = []
    single = ddp_worker.train(rows=rows).state_dict()
    for key, value in single.items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-6)
    # with the work split: each rank's student saw half the rows one process sees (two ranks each
    # training alone on all the data would reach the same weights, at twice the work)
    assert ranks[0]["rows"] == ranks[1]["rows"] == sum(rows) // 2 > 0


class _Crash(RuntimeError):
    pass


class _Data:
    """The worker's batches; raises after ``crash_after`` batches (a run killed mid-epoch)."""

    def __init__(self, crash_after: int | None) -> None:
        self.inner = ddp_worker.build()[2]
        self.crash_after = crash_after
        self.seen = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __call__(self, epoch: int = 0):
        for b in self.inner(epoch):
            if self.crash_after is not None and self.seen >= self.crash_after:
                raise _Crash("killed")
            self.seen += 1
            yield b


def _train(data: _Data, ckpt: Path | None, resume: bool) -> tuple[torch.nn.Module, int | None]:
    from potstill.passes.distill import TrainConfig
    from potstill.passes.elastic import make_supernet
    from potstill.passes.elastic.train import train_supernet

    torch.set_num_threads(1)
    teacher, student, _ = ddp_worker.build()
    net = make_supernet(student, (torch.zeros(2, 6),))
    cfg = TrainConfig(epochs=3, lr=1e-2, progress=False, checkpoint_dir=ckpt, checkpoint_every=2 if ckpt else 0,
                      resume=resume)
    result = train_supernet(net, teacher, data, cfg, random_subnets=1, temperature=2.0)
    return student, result.resumed_from


def test_interrupted_supernet_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    want = _train(_Data(None), None, False)[0].state_dict()
    with pytest.raises(_Crash):
        _train(_Data(7), tmp_path, False)  # 4 batches per epoch: stopped in epoch 2, last checkpoint at step 6
    resumed, resumed_from = _train(_Data(None), tmp_path, True)
    assert resumed_from == 6
    got = resumed.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)
