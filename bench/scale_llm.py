"""How compile time and peak memory grow with the teacher: Llama-style decoders through the default command.

Each case saves a randomly initialised ``LlamaForCausalLM`` (32k vocabulary, grouped-query attention,
untied embeddings) to a folder and runs, in a fresh child process,

    potstill compile hf:DIR --profile cpu --ratio 0.5 --no-distill -o OUT

It records the wall time, the child's CPU time (user + system: what other load on a shared
machine distorts least), its peak RSS (``wait4``'s ``ru_maxrss``, which covers the child
and the processes it waited for), that peak as a multiple of the fp32 weights, and the lowering
share: the ``lower.*`` pass times from the manifest plus the teacher's own lowering (from the console
line "timing the teacher" to the next line). Slopes are least-squares fits of time and RSS against
the parameter count. ``--large`` adds the 331M and ~1B cases (minutes and 10+ GB each).

    nice -n 10 .venv/bin/python bench/scale_llm.py --cases 44M,123M
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(os.environ.get("POTSTILL_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))

#: name -> (hidden, layers, intermediate, heads, kv heads); vocabulary 32000, untied embeddings
CASES: dict[str, tuple[int, int, int, int, int]] = {
    "44M": (512, 4, 1408, 8, 2),
    "123M": (768, 12, 2048, 12, 4),
    "331M": (1024, 24, 2816, 16, 4),
    "1B": (2048, 20, 5632, 32, 8),
}
LARGE = ("331M", "1B")
VOCAB = 32000


@dataclass
class CaseResult:
    case: str
    params: int
    fp32_weights_gb: float
    wall_s: float
    #: user + system CPU seconds of the child: robust to other load on a shared machine
    cpu_s: float
    peak_rss_gb: float
    rss_over_weights: float
    lowering_s: float
    lowering_share: float
    command: str
    returncode: int


def save_decoder(case: str, root: Path) -> tuple[Path, int]:
    """Save the case's random decoder under ``root``; returns the folder and its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv = CASES[case]
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
        max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    path = root / f"llama-{case}"
    model.save_pretrained(path)
    return path, n


def run_case(case: str, root: Path, extra: list[str]) -> CaseResult:
    path, n = save_decoder(case, root)
    out = root / f"out-{case}"
    cmd = [sys.executable, "-m", "potstill.cli", "compile", f"hf:{path}", "--profile", "cpu", "--ratio", "0.5",
           "--no-distill", "-o", str(out), *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip()))
        print(f"  [{lines[-1][0]:6.1f}s] {line.rstrip()}", flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    peak_gb = usage.ru_maxrss * 1024 / 1e9  # Linux reports KiB
    weights_gb = n * 4 / 1e9
    lowering = _lowering_seconds(out / "manifest.json", lines, wall)
    cpu = usage.ru_utime + usage.ru_stime
    return CaseResult(case, n, round(weights_gb, 3), round(wall, 1), round(cpu, 1), round(peak_gb, 2),
                      round(peak_gb / weights_gb, 2), round(lowering, 1), round(lowering / wall, 3),
                      " ".join(cmd[1:]), rc)  # fmt: skip


def _lowering_seconds(manifest: Path, lines: list[tuple[float, str]], wall: float) -> float:
    """``lower.*`` passes plus the teacher's ``record.teacher`` (its lowering, nearly all of it)."""
    total = 0.0
    timings: dict[str, Any] = {}
    if manifest.is_file():
        timings = json.loads(manifest.read_text()).get("timings", {})
    plans = timings.get("passes", timings)  # older manifests: {plan: rows} at the top
    for rows in plans.values() if isinstance(plans, dict) else []:
        total += sum(float(row[1]) for row in rows if str(row[0]).startswith(("lower.", "record.teacher")))
    if not any(str(row[0]).startswith("record.teacher") for rows in plans.values() for row in rows):
        for i, (t, text) in enumerate(lines):  # older drivers time the teacher outside the passes
            if text.startswith("timing the teacher"):
                total += (lines[i + 1][0] if i + 1 < len(lines) else wall) - t
    return total


def slopes(results: list[CaseResult]) -> dict[str, float]:
    """Least-squares slope (and intercept) of wall time and peak RSS against millions of parameters."""
    ok = [r for r in results if r.returncode == 0]
    if len(ok) < 2:
        return {}
    x = np.array([r.params / 1e6 for r in ok])
    out: dict[str, float] = {}
    series = (("s_per_mparam", [r.wall_s for r in ok]), ("cpu_s_per_mparam", [r.cpu_s for r in ok]),
              ("gb_per_mparam", [r.peak_rss_gb for r in ok]))
    for key, ys in series:
        slope, intercept = np.polyfit(x, np.array(ys), 1)
        out[key], out[key.split("_per")[0] + "_intercept"] = round(float(slope), 5), round(float(intercept), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="44M,123M", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--large", action="store_true", help="also run the 331M and ~1B cases")
    parser.add_argument("--tag", default="", help="suffix of the JSON file (e.g. 'before')")
    parser.add_argument("extra", nargs="*", help="extra arguments for potstill compile (after --)")
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if args.large:
        cases += [c for c in LARGE if c not in cases]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="potstill-scale-") as tmp:
        for case in cases:
            print(f"case {case}", flush=True)
            results.append(run_case(case, Path(tmp), list(args.extra)))
    fit = slopes(results)
    _print_table(results, fit)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "scale_llm" + (f"_{args.tag}" if args.tag else "") + ".json"
    record: dict[str, Any] = {"results": [asdict(r) for r in results], "slopes": fit, "argv": sys.argv[1:],
                              "cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]}  # fmt: skip
    (RESULTS / name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")
    return 0 if all(r.returncode == 0 for r in results) else 1


def _print_table(results: list[CaseResult], fit: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="potstill compile --profile cpu --ratio 0.5 --no-distill")
    for col in ("case", "parameters", "wall s", "CPU s", "peak RSS GB", "x fp32 weights", "lowering s",
                "lowering share", "rc"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r.case, f"{r.params / 1e6:.1f}M", f"{r.wall_s:.1f}", f"{r.cpu_s:.1f}", f"{r.peak_rss_gb:.2f}",
                      f"{r.rss_over_weights:.1f}", f"{r.lowering_s:.1f}", f"{r.lowering_share:.0%}", str(r.returncode))
    console = Console()
    console.print(table)
    if fit:
        console.print(f"slopes: {fit['s_per_mparam']:.3f} s ({fit['cpu_s_per_mparam']:.3f} CPU s) per M parameters, "
                      f"{fit['gb_per_mparam'] * 1e3:.1f} MB peak RSS per M parameters")


if __name__ == "__main__":
    raise SystemExit(main())
