"""On a CUDA machine: potstill's own AOTInductor CUDA target and a pruned student, end to end.

Prunes the bundled digits teacher with ``prune.width{ratio=0.5}`` through the pass pipeline, lowers
teacher and student with ``potstill.targets.lower`` on the ``cuda-aoti`` profile (package compiled
here, loaded and parity-checked in a child process), and records parity and latency, or the clear
error the target raises. Writes ``$OUT/gpu_potstill.json``.

    python bench/gpu_potstill.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from potstill.inputs.data import load_callable
    from potstill.pipeline import PassManager, build_pipeline
    from potstill.profiles import load_profile
    from potstill.state import CompileState
    from potstill.targets import lower

    out = Path(os.environ.get("OUT", "."))
    report: dict[str, object] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
    teacher = load_callable(f"{ROOT}/examples/digits_cnn.py:teacher")().eval()
    example = load_callable(f"{ROOT}/examples/digits_cnn.py:example_inputs")()
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    profile = load_profile("cuda-aoti")
    state = CompileState(teacher, example, profile=profile)
    PassManager(build_pipeline("importance.magnitude,prune.width{ratio=0.5}")).run(state)
    student = state.working().module
    for name, module in (("teacher", teacher), ("student", student)):
        t0 = time.time()
        try:
            with tempfile.TemporaryDirectory() as d:
                art = lower(module, example, profile, Path(d), target="aoti")
            report[name] = {**art.to_dict(), "seconds": round(time.time() - t0, 1)}
        except Exception as e:  # the target's own error is the finding
            report[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:],
                            "seconds": round(time.time() - t0, 1)}
        print(name, json.dumps(report[name], default=str)[:800], flush=True)
    (out / "gpu_potstill.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
