"""SmoothQuant before dynamic INT8, on the teachers' own FP32 engines (``potstill.targets.smoothquant``).

For each teacher the FP32 engine is exported once (potstill's exporter), then quantised dynamically
as the ``cpu`` profile does (per-channel weights, 7-bit where the CPU's products saturate) with and
without SmoothQuant's rescaling (scales from calibration text the held-out text does not share), and
each engine is scored against PyTorch on held-out text:

* ``minilm``: all-MiniLM-L6-v2, 256 docstring sentences (batch 8 x 64): mean cosine, nearest-neighbour
  agreement and Spearman rho of the mean-pooled embeddings;
* ``smollm2``: SmolLM2-135M (``$SMOLLM2_DIR``), 64 held-out sentences (batch 8 x 64, left padded):
  perplexity over PyTorch's and next-token agreement at the kept positions.

Latency: the three engines timed interleaved on one held-out batch (ONNX Runtime, 2 threads).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smoothquant.py minilm smollm2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import prune_cli as P


class Logits(nn.Module):
    """The Hugging Face model as ``(input_ids, attention_mask) -> the output's first tensor``."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.field)


def batches(tok: Any, sentences: list[str]) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(sentences), 8):
        enc = tok(sentences[i:i + 8], padding="max_length", truncation=True, max_length=64, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def teacher_case(case: str) -> tuple[nn.Module, list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """The wrapped teacher, calibration batches (text the CLI calibrates on) and held-out batches."""
    from potstill.inputs.corpus import docstring_corpus
    from potstill.inputs.hf_examples import load_tokenizer

    seen = docstring_corpus(4096)
    if case == "minilm":
        from transformers import AutoModel

        model = Logits(AutoModel.from_pretrained(P.minilm_path()).eval(), "last_hidden_state")
        tok = load_tokenizer(P.minilm_path())
        held = [s for s in C.docstring_sentences(4000, seed=1) if s not in set(seen)][:256]
        return model, batches(tok, seen[:256]), batches(tok, held)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(P.SMOLLM2_DIR, dtype=torch.float32).eval()
    lm.config.use_cache = False
    tok = load_tokenizer(P.SMOLLM2_DIR)
    return Logits(lm, "logits"), batches(tok, seen[:128]), P.smollm2_batches(64)


def score(case: str, outputs: list[np.ndarray], reference: list[torch.Tensor], held: list[dict[str, torch.Tensor]]
          ) -> dict[str, float]:
    if case == "minilm":
        def pool(h: np.ndarray, mask: torch.Tensor) -> np.ndarray:
            m = mask.numpy()[..., None].astype(np.float64)
            return (h * m).sum(1) / m.sum(1)

        return C.embedding_fidelity(np.concatenate([pool(o, b["attention_mask"]) for o, b in zip(outputs, held)]),
                                    np.concatenate([pool(r.numpy(), b["attention_mask"]) for r, b in zip(reference, held)]))
    t_nll, s_nll, agree, n = [], [], 0, 0
    for out, ref, b in zip(outputs, reference, held):
        tn, tt = P._nll_and_top1(ref, b["input_ids"], b["attention_mask"])
        sn, st = P._nll_and_top1(torch.from_numpy(out), b["input_ids"], b["attention_mask"])
        t_nll.append(tn)
        s_nll.append(sn)
        agree += int((tt == st).sum())
        n += int(tt.numel())
    return {"ppl_ratio": float(torch.cat(s_nll).mean().exp() / torch.cat(t_nll).mean().exp()),
            "next_token_agreement": agree / n}


def run_case(case: str, work: Path) -> list[dict[str, object]]:
    import onnxruntime as ort
    from potstill.targets.int8 import products_saturate, quantize_dynamic_onnx
    from potstill.targets.onnx_export import export_onnx
    from potstill.targets.smoothquant import smooth_onnx
    from potstill.targets.timing import session_options

    model, calib, held = teacher_case(case)
    with torch.no_grad():
        reference = [model(**b) for b in held]
    fp32 = work / f"{case}.onnx"
    export_onnx(model, (), fp32, dict(held[0]), dynamic_batch=True)
    paths = {"fp32": fp32, "dynamic": quantize_dynamic_onnx(fp32, work / f"{case}.int8.onnx")}
    opts = session_options(C.THREADS)

    def open_session(path: Path) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    smoothed = smooth_onnx(fp32, work / f"{case}.smoothed.onnx", [{k: v.numpy() for k, v in b.items()} for b in calib],
                           open_session, weight_bits=7 if products_saturate() else 8)
    paths["dynamic+smoothquant"] = quantize_dynamic_onnx(work / f"{case}.smoothed.onnx", work / f"{case}.sq.int8.onnx")
    rows = []
    feeds = [held[0]["input_ids"], held[0]["attention_mask"]]
    lat = C.interleaved_latency({k: C.OrtModel(p, feeds) for k, p in paths.items()})
    for name, path in paths.items():
        session = open_session(path)
        names = [i.name for i in session.get_inputs()]
        outputs = [session.run(None, {k: b[k].numpy() for k in names})[0] for b in held]
        rows.append({"teacher": case, "engine": name, **score(case, outputs, reference, held),
                     "ms": lat[name]["median"], "speedup": lat["fp32"]["median"] / lat[name]["median"],
                     **({"smoothquant": smoothed.describe()} if name == "dynamic+smoothquant" else {})})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+", choices=("minilm", "smollm2"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    C.setup()
    from rich.console import Console
    from rich.table import Table

    rows = []
    with tempfile.TemporaryDirectory(prefix="potstill-sq-") as tmp:
        for case in args.cases:
            rows += C.timed(case, lambda case=case: run_case(case, Path(tmp)))
    table = Table("teacher", "engine", "fidelity", "speed-up vs FP32", title="SmoothQuant before dynamic INT8")
    for r in rows:
        fid = (f"cosine {r['cosine']:.4f}, NN {r['nn_agreement']:.3f}" if "cosine" in r
               else f"perplexity {r['ppl_ratio']:.3f}x, next-token {r['next_token_agreement']:.3f}")
        table.add_row(str(r["teacher"]), str(r["engine"]), fid, f"{r['speedup']:.2f}x")
    Console().print(table)
    print("wrote", C.write_json("smoothquant" + (f"_{args.tag}" if args.tag else ""), {"rows": rows}))


if __name__ == "__main__":
    main()
