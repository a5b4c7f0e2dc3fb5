from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from potstill.passes.distill.checkpoint import latest_checkpoint, load_checkpoint

from . import resume_worker

HERE = Path(__file__).parent


def _start(out: Path, mode: str, delay: float) -> subprocess.Popen[bytes]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(HERE / "resume_worker.py"), str(out), mode, str(delay)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    proc = _start(tmp_path, "fresh", 0.05)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        last = latest_checkpoint(tmp_path / "ck")
        if last is not None and int(last.stem.split("-")[1]) >= 20:  # past the first epoch (16 steps)
            proc.kill()
            killed_at = int(last.stem.split("-")[1])
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_at is not None, "the run finished or stalled before a checkpoint appeared"
    assert not (tmp_path / "final.pt").exists()
    state = load_checkpoint(latest_checkpoint(tmp_path / "ck"))  # type: ignore[arg-type]
    assert state["epoch"] == 1 and 0 < state["position"] < 16  # killed mid-epoch

    resumed = _start(tmp_path, "resume", 0.0)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err.decode()[-3000:]
    got = torch.load(tmp_path / "final.pt", weights_only=True)
    assert (tmp_path / "resumed_from.txt").read_text() == str(state["step"])  # it resumed, not restarted
    want = resume_worker.run(None, resume=False).state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-7)
    # the log holds each step once, with the resumed steps after the checkpoint
    steps = [r["step"] for r in map(json.loads, (tmp_path / "ck" / "log.jsonl").read_text().splitlines())
             if "lr" in r]
    assert steps == list(range(1, 49))
