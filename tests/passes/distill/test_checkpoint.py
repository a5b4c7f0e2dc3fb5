"""Checkpoints are data, never code: safetensors + JSON, exact round trips, planted pickles refused."""

from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from potstill.errors import InputError
from potstill.passes.distill import DistillTrainer, TensorBatches, TrainConfig
from potstill.passes.distill import checkpoint as ck

from .conftest import mlp


class _Planted:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_state_round_trips_exactly(tmp_path: Path) -> None:
    model = mlp(4, 8, 3, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    payload = {"students": [model.state_dict()], "optimizer": opt.state_dict(), "rng": [ck.rng_state()],
               "odd": {3: (1.5, float("-inf"), float("nan")), "$k": None}, "step": 7}  # fmt: skip
    path = ck.save_checkpoint(tmp_path, 7, payload)
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "tensors.safetensors"]
    json.loads((path / "state.json").read_text())  # standard JSON (no bare NaN)
    back = ck.load_checkpoint(path)
    torch.testing.assert_close(back["students"][0], model.state_dict(), rtol=0, atol=0)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    torch.testing.assert_close(fresh.state_dict()["state"], opt.state_dict()["state"], rtol=0, atol=0)
    assert (
        back["odd"][3][:2] == (1.5, float("-inf"))
        and math.isnan(back["odd"][3][2])
        and back["odd"]["$k"] is None
    )
    ck.set_rng_state(back["rng"][0])
    a = (torch.rand(3), np.random.rand(), random.random())
    ck.set_rng_state(payload["rng"][0])
    assert (torch.rand(3).tolist(), np.random.rand(), random.random()) == (a[0].tolist(), a[1], a[2])


def test_planted_pickle_is_refused_not_executed(tmp_path: Path, teacher_data) -> None:
    teacher, x, _ = teacher_data
    marker = tmp_path / "code-ran"
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / "step-00000099.pt").write_bytes(pickle.dumps(_Planted(marker)))
    cfg = TrainConfig(epochs=1, progress=False, checkpoint_dir=ckpt_dir, resume=True)
    with pytest.raises(
        InputError, match=r"pickled checkpoint file\(s\) \['step-00000099.pt'\].*never unpickles"
    ):
        DistillTrainer(mlp(8, 16, 5, seed=3), teacher, "kd", cfg).fit(TensorBatches(x[:64], batch_size=32))
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    step = tmp_path / "step-00000005"
    step.mkdir()
    (step / "state.json").write_text(json.dumps({"format": ck.FORMAT, "payload": {"w": {"$tensor": "t0"}}}))
    (step / "tensors.safetensors").write_bytes(pickle.dumps(_Planted(marker)))
    assert ck.latest_checkpoint(tmp_path) == step
    with pytest.raises(InputError, match=r"tensors.safetensors: not a safetensors file.*never unpickles"):
        ck.load_checkpoint(step)
    assert not marker.exists()
    (step / "state.json").write_text("{not json")
    with pytest.raises(InputError, match="not a readable checkpoint state"):
        ck.load_checkpoint(step)


def test_no_pickle_reader_left_in_the_package() -> None:
    """Every torch.load in potstill's own code passes weights_only=True."""
    import re

    root = Path(__file__).resolve().parents[3]
    offenders = []
    for folder in ("compiler", "passes", "targets", "profiles", "bench", "examples"):
        for path in (root / folder).rglob("*.py"):
            for call in re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", path.read_text(encoding="utf-8")):
                if "weights_only=True" not in call:
                    offenders.append(f"{path.relative_to(root)}: {call}")
    assert not offenders, offenders
