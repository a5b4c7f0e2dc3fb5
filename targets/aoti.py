"""AOTInductor: ``torch.export`` → ``aoti_compile_and_package`` → ``model.pt2``, checked in a child.

The package is compiled in this process, but loaded (``torch._inductor.aoti_load_package``), run on
the held-out inputs and timed in a child Python process: loading a generated wrapper library can
crash the process (seen on a CUDA machine: a segfault while loading a package for a two-layer MLP),
and a crash there must become a ``PotstillError`` naming the signal, not a dead compile. CPU here;
CUDA when the profile's device is ``cuda`` and CUDA is present.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from potstill.errors import PotstillError
from potstill.outputs.atomic import atomic_path
from potstill.profiles import DeviceProfile
from torch import nn

from .artifact import Artifact
from .onnx_export import FlatInputs, batch_of_two, flat_spec
from .onnxruntime import fixed_batch
from .parity import batch_size, check_parity, held_out_inputs, raise_if_failed
from .registry import target

CHILD_TIMEOUT_S = 600

_CHILD = r"""
import json, statistics, sys, time
import torch
pkg, cases_path, out_path, threads, device, budget = sys.argv[1:7]
if int(threads) > 0:
    torch.set_num_threads(int(threads))
runner = torch._inductor.aoti_load_package(pkg)
cases = torch.load(cases_path, weights_only=True)
outputs = []
def first(out):
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out
with torch.inference_mode():
    for flat in cases:
        flat = [t.to(device) for t in flat]
        outputs.append(first(runner(*flat)).float().cpu())
    flat = [t.to(device) for t in cases[0]]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        runner(*flat)
    sync()
    times, start = [], time.perf_counter()
    while len(times) < 200 and (len(times) < 5 or time.perf_counter() - start < float(budget)):
        t0 = time.perf_counter()
        runner(*flat)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
times.sort()
latency = {"median": statistics.median(times), "p90": times[min(len(times) - 1, round(0.9 * (len(times) - 1)))],
           "runs": float(len(times))}
torch.save(outputs, out_path)
print(json.dumps(latency))
"""


def compile_package(wrapper: nn.Module, flat: tuple[torch.Tensor, ...], path: Path, dynamic: bool) -> None:
    """``torch.export`` (batch dynamic when asked) and AOTInductor-compile into ``path``."""
    dynamic_shapes: Any = None
    if dynamic:
        flat = batch_of_two(flat)
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = (tuple({0: batch} if t.dim() > 0 else None for t in flat),)
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        program = torch.export.export(wrapper, flat, dynamic_shapes=dynamic_shapes, strict=False)
        with atomic_path(path) as tmp:
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))


def run_package_in_child(
    path: Path, cases: Sequence[Sequence[torch.Tensor]], device: str, *, threads: int | None = None,
    budget_s: float = 1.0,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Load ``path`` in a child process, run ``cases``; (outputs, latency of case 0)."""
    with tempfile.TemporaryDirectory(prefix="potstill-aoti-") as tmp:
        cases_path, out_path = Path(tmp) / "cases.pt", Path(tmp) / "outputs.pt"
        torch.save([[t.detach().cpu() for t in c] for c in cases], cases_path)
        cmd = [sys.executable, "-c", _CHILD, str(path), str(cases_path), str(out_path), str(threads or 0),
               device, str(budget_s)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as e:
            raise PotstillError(f"{path}: loading/running the AOTInductor package timed out after "
                                f"{CHILD_TIMEOUT_S} s in the child process") from e
        if proc.returncode != 0:
            raise PotstillError(_child_failure(path, proc.returncode, proc.stderr))
        outputs = torch.load(out_path, weights_only=True)
        latency = json.loads(proc.stdout.strip().splitlines()[-1])
    return outputs, latency


def _child_failure(path: Path, code: int, stderr: str) -> str:
    tail = "\n".join(stderr.strip().splitlines()[-8:])
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return (f"{path}: the AOTInductor package crashed the process that loaded it ({name}, exit "
                f"{code}); the compile itself finished. This is a crash in the generated wrapper "
                f"library or the runtime, not in potstill. Child stderr:\n{tail}")
    return f"{path}: loading or running the AOTInductor package failed (exit {code}):\n{tail}"


@target("aoti")
def lower_aoti(
    module: nn.Module,
    args: Sequence[Any],
    profile: DeviceProfile,
    out_dir: str | Path,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    budget_s: float = 1.0,
) -> Artifact:
    """AOTInductor package of ``module``, parity-checked and timed in a child process."""
    out_dir = Path(out_dir)
    notes: list[str] = []
    device = "cpu"
    if profile.device == "cuda":
        if torch.cuda.is_available():
            device = "cuda"
        else:
            notes.append("profile asks for CUDA but none is available here: compiled for CPU")
    module = module.eval()
    inputs = fixed_batch(args, kwargs or {}, profile.batch)
    dynamic = dynamic_batch and profile.batch is None
    spec = flat_spec(module, *inputs)
    on_device = copy.deepcopy(module).to(device) if device != "cpu" else module
    wrapper = FlatInputs(on_device, spec.n_args, spec.kw_names, spec.fixed).eval()
    flat = tuple(t.to(device) for t in spec.flatten(*inputs))
    path = out_dir / "model.pt2"
    compile_package(wrapper, flat, path, dynamic)
    cases = held_out_inputs(*inputs, other_batch=batch_size(*inputs) + 2 if dynamic else None)
    outputs, latency = run_package_in_child(path, [spec.flatten(*c) for c in cases], device,
                                            threads=profile.threads, budget_s=budget_s)
    by_case = iter(outputs)  # the child already ran every case, in order
    tol = profile.tolerance
    parity = check_parity(module, lambda _case: next(by_case).numpy(), cases, tol)
    raise_if_failed(parity, f"AOTInductor package {path}", tol)
    notes.append(f"AOTInductor package for {device}, batch {'dynamic' if dynamic else 'fixed'}; "
                 f"inputs {spec.names}; loaded and checked in a child process")
    return Artifact("aoti", "fp32", {"pt2": path}, parity, latency, notes)
