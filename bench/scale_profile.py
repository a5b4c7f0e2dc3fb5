"""Where a compile's time and peak RSS go: the default command in-process, RSS sampled per phase.

A sampler thread reads this process's RSS (psutil) every 20 ms and charges it to the current phase.
Phases are the driver's console notes, the passes (a ``PassInstrument``), and a few library steps
wrapped here for labelling only: ``analyze`` (torch.export capture + coupling), the ONNX export,
Optimum's export, ONNX Runtime parity/timing and ``student.pt2``. Prints, per phase in order: its
seconds, RSS when it began, and the peak RSS inside it.

    nice -n 10 .venv/bin/python bench/scale_profile.py 44M
"""

from __future__ import annotations

import functools
import importlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_llm import save_decoder


class PhaseSampler:
    """Peak RSS and time per named phase; ``enter(name)`` switches the phase."""

    def __init__(self, period_s: float = 0.02) -> None:
        self.proc = psutil.Process()
        self.rows: list[list[Any]] = []  # [name, t_start, rss_start, peak]
        self.period_s = period_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.enter("start")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def enter(self, name: str) -> str:
        rss = self.proc.memory_info().rss
        with self._lock:
            previous = self.rows[-1][0] if self.rows else ""
            self.rows.append([name, time.perf_counter() - self.t0, rss, rss])
        return previous

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            rss = self.proc.memory_info().rss
            with self._lock:
                self.rows[-1][3] = max(self.rows[-1][3], rss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> None:
        end = time.perf_counter() - self.t0
        print(f"{'phase':58s} {'s':>7s} {'RSS in':>8s} {'peak':>8s}")
        for i, (name, t, rss, peak) in enumerate(self.rows):
            t_next = self.rows[i + 1][1] if i + 1 < len(self.rows) else end
            print(f"{name[:58]:58s} {t_next - t:7.1f} {rss / 1e9:8.2f} {peak / 1e9:8.2f}")
        print(f"overall peak {max(r[3] for r in self.rows) / 1e9:.2f} GB; wall {end:.1f} s")


def label(sampler: PhaseSampler, module: str, name: str) -> None:
    """Wrap ``module.name`` so calls to it are their own phase (then the caller's phase resumes)."""
    mod = importlib.import_module(module)
    fn: Callable[..., Any] = getattr(mod, name)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        previous = sampler.enter(f"  {name}")
        try:
            return fn(*args, **kwargs)
        finally:
            sampler.enter(previous + " (cont.)" if not previous.endswith("(cont.)") else previous)

    setattr(mod, name, wrapped)


def main() -> None:
    from potstill.driver import compile_teacher
    from potstill.pipeline import PassInstrument
    from potstill.plan import CompileOptions

    case = sys.argv[1] if len(sys.argv) > 1 else "44M"
    extra = dict(a.split("=", 1) for a in sys.argv[2:])
    sampler = PhaseSampler()

    class Phases(PassInstrument):
        def before_pass(self, p: Any, state: Any) -> None:
            sampler.enter(f"pass {p.spec()}")

        def after_pass(self, p: Any, state: Any, result: Any) -> None:
            sampler.enter(f"after {p.spec()}")

    for module, name in (("potstill.ir.capture", "analyze"), ("potstill.targets.onnxruntime", "export_onnx"),
                         ("potstill.targets.optimum_export", "optimum_export"),
                         ("potstill.targets.onnxruntime", "ort_parity_and_latency"),
                         ("potstill.targets.onnxruntime", "_same_model"),
                         ("potstill.outputs.students_io", "save_program"), ("potstill.outputs.students_io", "save_student"),
                         ("potstill.fidelity", "measure_fidelity")):  # fmt: skip
        label(sampler, module, name)
    with tempfile.TemporaryDirectory(prefix="potstill-prof-") as tmp:
        sampler.enter("save random decoder")
        path, n = save_decoder(case, Path(tmp))
        sampler.enter("import + load")
        opts = CompileOptions(teacher=f"hf:{path}", out=str(Path(tmp) / "out"), profile="cpu", ratios=(0.5,),
                              distill=False, **extra)  # fmt: skip
        compile_teacher(opts, note=lambda s: (print(s), sampler.enter(s[:58])), instruments=[Phases()])
    sampler.stop()
    print(f"{case}: {n / 1e6:.1f}M parameters, fp32 weights {n * 4 / 1e9:.2f} GB")
    sampler.report()


if __name__ == "__main__":
    main()
