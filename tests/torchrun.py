"""Run a worker script under ``torchrun`` with two CPU ranks (gloo), as the distributed tests do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_two_ranks(script: Path, out_dir: Path, timeout: int = 240) -> None:
    """``python -m torch.distributed.run --nproc_per_node 2 script out_dir``; fails with its stderr."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out_dir)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
