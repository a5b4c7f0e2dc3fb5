"""Real pretrained teachers through the default command, before and after the default distillation (issue 17).

For each teacher and each mode, one ``potstill compile`` exactly as a user types it (no ``--pipeline``):

    potstill compile TEACHER --profile cpu --ratio R ... --data DATA --no-distill -o OUT          # before
    potstill compile TEACHER --profile cpu --ratio R ... --data DATA --train-minutes M -o OUT     # after

then every student's ONNX engine is scored on held-out data that neither calibration nor training saw:

* ``minilm`` (all-MiniLM-L6-v2): ``--data`` is a corpus of docstring sentences; scored by mean cosine,
  nearest-neighbour agreement and Spearman rho of sentence embeddings on 512 other sentences
  (``prune_cli.evaluate_minilm``);
* ``effnet`` (EfficientNet-Lite0): ``--data`` is a folder of 20 photo crops (augmented by default);
  scored by top-1 agreement on 96 other crops (``prune_cli.evaluate_logits``). The crops come from
  the dozen photographs that ship with scikit-image and scikit-learn, so training and held-out crops
  are different crops of the same scenes (no other photographs exist offline here);
* ``smollm2`` (SmolLM2-135M, ``/work/models/smollm2``): ``--data`` is a prose corpus; scored by
  next-token agreement and the perplexity ratio on 64-token windows of held-out prose.

The speed-up is the CLI's own (ONNX Runtime, 2 threads, against the teacher's engine in the same
session). Prints a table, writes ``bench/results/real_teachers.json`` and plots fidelity against the
measured speed-up (one line per teacher, dashed before and solid after distillation) into
``docs/real_teachers.png``.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/real_teachers.py minilm effnet --minutes 2 --ratio 0.4
    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/real_teachers.py          # the full run (10/10/15 min)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import prune_cli as P

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = Path(os.environ.get("POTSTILL_SMOLLM2", "/work/models/smollm2"))
WORK = Path(os.environ.get("POTSTILL_BENCH_WORK", "/tmp/potstill-real-teachers"))


@dataclass
class Case:
    teacher: Callable[[], str]
    data: Callable[[Path], Path]
    evaluate: Callable[[Path], dict[str, float]]
    score: str
    ratios: tuple[float, ...]
    minutes: float


# ---------------------------------------------------------------------------------------------
# Data the compile reads (disjoint from what each case is scored on)


def _minilm_corpus(work: Path) -> Path:
    from potstill.inputs.teacher import docstring_corpus

    held = set(C.docstring_sentences(4000, seed=1)[:1200])  # a superset of evaluate_minilm's 512
    seen = set(docstring_corpus(4096))
    lines = [s for s in C.docstring_sentences(20000, seed=7) if s not in held and s not in seen]
    path = work / "minilm_corpus.txt"
    path.write_text("\n".join(lines[:4000]) + "\n", encoding="utf-8")
    return path


def _effnet_photos(work: Path) -> Path:
    import real_teachers_effnet as E

    return E.save_photos(work / "photos", n=20, seed=4)


def _prose(seed: int, limit: int) -> list[str]:
    return C.docstring_sentences(limit, seed=seed)


def _lm_corpus(work: Path) -> Path:
    held = set(_prose(11, 3000)[:600])
    lines = [s for s in _prose(5, 20000) if s not in held]
    path = work / "lm_corpus.txt"
    path.write_text("\n".join(lines[:3000]) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Scoring on held-out data


def _effnet_evaluate(onnx: Path) -> dict[str, float]:
    import prune_effnet_teacher as E

    return P.evaluate_logits(onnx, E.teacher(), E.heldout_images(), None)


def evaluate_lm(onnx: Path, windows: int = 48, length: int = 64) -> dict[str, float]:
    """Next-token agreement and perplexity ratio of the ONNX student against the torch teacher on
    ``windows`` unpadded ``length``-token windows of held-out prose."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    teacher = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    ids = tok(" ".join(_prose(11, 3000)[:600]), return_tensors="pt")["input_ids"][0]
    ids = ids[: windows * length].view(-1, length)
    sess = P.session(onnx)
    names = [i.name for i in sess.get_inputs()]
    agree, nll_t, nll_s, n = 0.0, 0.0, 0.0, 0
    for i in range(0, len(ids), 8):
        x = ids[i : i + 8]
        feeds = {"input_ids": x.numpy(), "attention_mask": np.ones_like(x.numpy()),
                 "position_ids": np.broadcast_to(np.arange(length), x.shape).copy()}  # fmt: skip
        zs = torch.tensor(sess.run(None, {k: feeds[k] for k in names})[0])[:, :-1].float()
        with torch.no_grad():
            zt = teacher(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        agree += float((zs.argmax(-1) == zt.argmax(-1)).sum())
        nll_s += float(torch.nn.functional.cross_entropy(zs.reshape(-1, zs.shape[-1]), target.reshape(-1), reduction="sum"))
        nll_t += float(torch.nn.functional.cross_entropy(zt.reshape(-1, zt.shape[-1]), target.reshape(-1), reduction="sum"))
        n += target.numel()
    ppl_s, ppl_t = float(np.exp(nll_s / n)), float(np.exp(nll_t / n))
    x = ids[:8].numpy()
    timing = P.interleaved_speedup("smollm2", onnx, {"input_ids": x, "attention_mask": np.ones_like(x),
                                                     "position_ids": np.broadcast_to(np.arange(length), x.shape).copy()})
    return {"next_token_agreement": agree / n, "ppl_ratio": ppl_s / ppl_t, "ppl": ppl_s, "teacher_ppl": ppl_t, "n": n,
            **timing}


CASES: dict[str, Case] = {
    "minilm": Case(lambda: f"hf:{P.minilm_path()}", _minilm_corpus, P.evaluate_minilm, "cosine", (0.25, 0.4, 0.5), 10.0),
    "effnet": Case(lambda: f"{ROOT / 'bench' / 'real_teachers_effnet.py'}:teacher", _effnet_photos, _effnet_evaluate,
                   "top1_agreement", (0.25, 0.4, 0.5), 10.0),
    "smollm2": Case(lambda: f"hf:{SMOLLM2}", _lm_corpus, evaluate_lm, "next_token_agreement", (0.2, 0.3), 15.0),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# One compile per (teacher, mode)


def compile_cli(teacher: str, ratios: tuple[float, ...], data: Path, minutes: float | None, out: Path,
                log: Path) -> tuple[list[str], float, float]:  # fmt: skip
    cmd = [P.POTSTILL, "compile", teacher, "--profile", "cpu", *[a for r in ratios for a in ("--ratio", f"{r:g}")],
           "--data", str(data), *(["--no-distill"] if minutes is None else ["--train-minutes", f"{minutes:g}"]),
           "--no-cache", "--force", "-o", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("w") as f:
        subprocess.run(cmd, check=True, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return cmd, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_case(name: str, case: Case, ratios: tuple[float, ...], minutes: float, modes: list[str]) -> list[dict[str, Any]]:
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    data = case.data(work)
    rows = []
    for mode in modes:
        out = work / f"out-{mode}"
        cmd, wall, cpu = compile_cli(case.teacher(), ratios, data, minutes if mode == "distill" else None, out,
                                     work / f"{mode}.log")  # fmt: skip
        manifest = json.loads((out / "manifest.json").read_text())
        for s in manifest["students"]:
            fid = case.evaluate(C.student_engine(out, s))
            d = (s.get("metrics") or {}).get("distill") or {}
            rows.append({
                "teacher": name, "mode": mode, "student": s["name"],
                # the held-out batch timed against the teacher's engine in alternating rounds, else the CLI's
                "speedup": fid.get("speedup_interleaved") or s.get("speedup"), "cli_speedup": s.get("speedup"),
                "macs_reduction": s.get("macs_reduction"), "latency_ms": s.get("latency_ms"), "heldout": fid,
                "score": fid.get(case.score), "score_name": case.score,
                # the compile's own held-out measure (its calibration's held-out quarter), before and after training
                "compile_fidelity": (s.get("fidelity") or {}).get("score"),
                "compile_fidelity_before_distill": ((s.get("metrics") or {}).get("fidelity_before_distill") or {}).get("score"),
                "distill": {k: d.get(k) for k in ("method", "lr", "lr_probe", "steps", "minutes_used", "budget_minutes",
                                                  "stopped_by_budget", "augment", "heldout")} if d else None,
                "command": " ".join(cmd), "compile_wall_s": wall, "compile_cpu_s": cpu,
            })  # fmt: skip
            print(json.dumps(rows[-1], default=str), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="real teachers, default command: held-out fidelity before / after distillation")
    for col in ("teacher", "student", "mode", "speed-up", "held-out score", "other measures", "KD steps", "KD min"):
        t.add_column(col, justify="left" if col in ("teacher", "student", "mode", "other measures") else "right")
    for r in rows:
        d = r["distill"] or {}
        other = ", ".join(f"{k} {v:.3f}" for k, v in r["heldout"].items() if k != r["score_name"] and k != "n"
                          and isinstance(v, float))  # fmt: skip
        minutes = d.get("minutes_used")
        t.add_row(r["teacher"], r["student"], r["mode"], f"{r['speedup']:.2f}×" if r["speedup"] else "—",
                  f"{r['score_name']} {r['score']:.3f}", other, str(d.get("steps", "—")),
                  "—" if minutes is None else f"{minutes:.1f}" + (" ⏱" if d.get("stopped_by_budget") else ""))  # fmt: skip
    return t


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(dict.fromkeys(r["teacher"] for r in rows)):
        color = f"C{i}"
        for mode, style in (("none", "--"), ("distill", "-")):
            pts = sorted((r["speedup"], r["score"]) for r in rows
                         if r["teacher"] == name and r["mode"] == mode and r["speedup"])  # fmt: skip
            if pts:
                score = next(r["score_name"] for r in rows if r["teacher"] == name)
                label = f"{name} ({score}), " + ("pruned only" if mode == "none" else "+ default distillation")
                ax.plot(*zip(*pts), style, marker="o", color=color, label=label)
    ax.set_xlabel("measured speed-up (ONNX Runtime, 2 threads)")
    ax.set_ylabel("held-out fidelity to the teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", metavar="CASE", help=f"some of {', '.join(CASES)} (default: all)")
    ap.add_argument("--ratio", type=float, action="append", help="ratios (default: each case's)")
    ap.add_argument("--minutes", type=float, default=None, help="--train-minutes for every case (default 10/10/15)")
    ap.add_argument("--modes", default="none,distill", help="none (--no-distill), distill (--train-minutes), or both")
    ap.add_argument("--tag", default="", help="suffix of the JSON name (real_teachers_TAG.json)")
    args = ap.parse_args()
    C.setup()
    from rich.console import Console

    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    rows: list[dict[str, Any]] = []
    for name in args.cases or list(CASES):
        case = CASES[name]
        ratios = tuple(args.ratio) if args.ratio else case.ratios
        rows += run_case(name, case, ratios, args.minutes or case.minutes, args.modes.split(","))
    Console(width=160).print(table(rows))
    name = "real_teachers" + (f"_{args.tag}" if args.tag else "")
    path = C.write_json(name, {"command": " ".join(sys.argv), "rows": rows})
    png = plot(rows, ROOT / "docs" / f"{name}.png")
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
