"""FSDP2 on CPU with gloo: two ranks, each holding half of every parameter and training on half of
every batch, end with the weights one process gets on whole batches — by hand (``fsdp_worker``) and
through ``DistillTrainer(parallel="fsdp")`` (``fsdp_trainer_worker``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from potstill.errors import InputError
from potstill.passes.distill import DistillTrainer, TrainConfig
from potstill.passes.distill.checkpoint import latest_checkpoint, load_checkpoint
from potstill.passes.distill.fsdp import repeated_blocks

from tests.torchrun import run_two_ranks

from . import fsdp_trainer_worker, fsdp_worker

HERE = Path(__file__).parent


def test_repeated_blocks_are_the_layer_list() -> None:
    net = fsdp_worker.Net()
    assert repeated_blocks(net) == list(net.layers)
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    assert repeated_blocks(seq) == [seq[0], seq[2]]  # no list: the children with parameters


def test_two_rank_fsdp2_equals_single_process(tmp_path: Path) -> None:
    run_two_ranks(HERE / "fsdp_worker.py", tmp_path)
    got = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    assert got["world"] == 2 and got["local_rows"] == 3  # each rank held 3 of the 6 rows
    teacher, student, x = fsdp_worker.build()
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    fsdp_worker.train(student, teacher, list(x))
    for key, value in student.state_dict().items():
        torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(initial["head.weight"], student.state_dict()["head.weight"])  # it trained


def test_trainer_fsdp_on_two_ranks_equals_one_process_and_resumes(tmp_path: Path) -> None:
    """DistillTrainer(parallel="fsdp") on 2 gloo ranks: the same weights as one process on the same
    global batches, a plain student on every rank, full-weight checkpoints, and a resumed run that
    ends where the uninterrupted one did."""
    run_two_ranks(HERE / "fsdp_trainer_worker.py", tmp_path)
    ranks = [torch.load(tmp_path / f"fsdp-trainer-{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["world"] == 2 and r["plain"] for r in ranks)  # no FSDP class, no DTensor left
    assert ranks[0]["written"] == [f"step-{s:08d}" for s in (3, 6, 9, 12)]
    assert all(r["resumed_from"] == 6 for r in ranks)
    single, _ = fsdp_trainer_worker.train()
    _, initial, _ = fsdp_trainer_worker.build()
    for key, value in single.state_dict().items():
        for got in ranks:
            torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["resumed"][key], value, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(initial.state_dict()[key], value)  # it trained
    # rank 0 wrote the whole weights (5 rows, not a shard of 3) and the whole momentum
    latest = latest_checkpoint(tmp_path / "ck")
    assert latest is not None
    ck = load_checkpoint(latest)
    assert ck["world_size"] == 2 and ck["students"][0]["layers.0.weight"].shape == (5, 6)
    assert ck["optimizer"]["state"][0]["momentum_buffer"].shape == (5, 6)


def test_fsdp_outside_torchrun_is_an_error() -> None:
    teacher, student, _ = fsdp_trainer_worker.build()
    with pytest.raises(InputError, match=r"parallel=fsdp needs several processes under torchrun"):
        DistillTrainer(student, teacher, "kd", TrainConfig(parallel="fsdp"))
    with pytest.raises(InputError, match=r"parallel must be one of auto, ddp, fsdp, got 'zero'"):
        DistillTrainer(student, teacher, "kd", TrainConfig(parallel="zero"))
