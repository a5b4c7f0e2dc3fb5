from __future__ import annotations

from pathlib import Path

import torch
from potstill.passes.distill.checkpoint import latest_checkpoint, load_checkpoint

from tests.torchrun import run_two_ranks

from . import ddp_worker

HERE = Path(__file__).parent


def test_two_process_gloo_ddp_equals_single_process(tmp_path: Path) -> None:
    run_two_ranks(HERE / "ddp_worker.py", tmp_path)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["world"] == 2
    rows: list[int] = []
    single = ddp_worker.train(rows=rows).state_dict()
    # each rank trained on its half of every global batch (25 -> 12 + 13, 21 -> 10 + 11)
    per_rank = [list(map(int, (tmp_path / f"rows-{r}.txt").read_text().split())) for r in range(2)]
    assert [a + b for a, b in zip(*per_rank)] == rows
    assert all(0 <= b - a <= 1 for a, b in zip(*per_rank)) and sorted(set(per_rank[0])) == [10, 12]
    for key, value in single.items():
        torch.testing.assert_close(ddp["state"][key], value, rtol=1e-5, atol=1e-6)
    # rank 0 alone wrote the checkpoint, with both ranks' RNG states
    ck = load_checkpoint(latest_checkpoint(tmp_path / "ck"))  # type: ignore[arg-type]
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    # and it moved: the student is not its initial self
    _, initial, _ = ddp_worker.build()
    assert not torch.allclose(initial.state_dict()["0.weight"], single["0.weight"])
