"""Least-squares reconstruction one block at a time against whole-model captures, on a decoder.

Prunes every second FFN neuron and KV group of a random Llama-style decoder (``scale_llm``'s
cases), then refits the consumers (``passes.prune.reconstruct``) both ways on the same calibration
batches and prints the seconds each took and the largest weight difference between the two
students (they solve the same least-squares problems, so it should be rounding).

    nice -n 10 .venv/bin/python bench/reconstruct_layerwise.py --case 44M --batches 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import setup, write_json
from scale_llm import CASES, VOCAB


def main(argv: list[str] | None = None) -> int:
    from potstill.inputs.data import Batch
    from potstill.ir.capture import analyze
    from potstill.ir.surgery import prune_width
    from potstill.passes.prune.reconstruct import reconstruct
    from rich.console import Console
    from rich.table import Table
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="44M", choices=list(CASES))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    setup()
    hidden, layers, inter, heads, kv = CASES[args.case]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    batches = [Batch((), {"input_ids": torch.randint(0, VOCAB, (1, args.tokens)),
                          "attention_mask": torch.ones(1, args.tokens, dtype=torch.long)})
               for _ in range(args.batches)]  # fmt: skip
    a = analyze(model, (), {**batches[0].kwargs, "use_cache": False})
    keep = {g.id: list(range(0, g.n_units, 2)) for g in a.prunable() if g.kind in ("neurons", "kv_heads")}
    rows, students = [], {}
    for layerwise in (True, False):
        student = prune_width(model, a, keep)
        t0 = time.perf_counter()
        done = reconstruct(model, student, a, keep, batches, layerwise=layerwise)
        rows.append({"path": "layer by layer" if layerwise else "whole model", "seconds": round(time.perf_counter() - t0, 2),
                     "layers_refitted": len(done)})  # fmt: skip
        students[layerwise] = student
    diff = max(float((p - q).abs().max()) for p, q in zip(students[True].state_dict().values(),
                                                          students[False].state_dict().values()))  # fmt: skip
    table = Table(title=f"reconstruct, {args.case} decoder, {args.batches} x {args.tokens} tokens")
    for col in ("path", "seconds", "layers refitted"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["path"], f"{r['seconds']:.1f}", str(r["layers_refitted"]))
    Console().print(table)
    print(f"largest weight difference between the two students: {diff:.2e}")
    print(f"wrote {write_json(f'reconstruct_layerwise_{args.case}', {'rows': rows, 'max_weight_diff': diff, 'argv': sys.argv[1:]})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
