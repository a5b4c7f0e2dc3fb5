"""FSDP2 on CPU with gloo: two ranks, each holding half of every parameter and training on half of
every batch, end with the weights one process gets on whole batches."""

from __future__ import annotations

from pathlib import Path

import torch
from potstill.passes.distill.fsdp import repeated_blocks

from tests.torchrun import run_two_ranks

from . import fsdp_worker

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
