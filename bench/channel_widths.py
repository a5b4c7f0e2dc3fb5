"""What a channel costs on this host's ONNX Runtime: latency against width, to read a channel multiple off.

Kept widths are rounded to the profile's ``channel_multiple`` (the ``cpu`` profile says 8) on the
premise that kernels run whole vector lanes, so widths between two multiples cost as much as the
wider. This times, interleaved (``_common.interleaved_latency``), two 3x3 convolutions of C -> C
channels at 16x16 and 8x8 pixels (the digits example's stages), and a C -> 4C -> C MLP over 512
tokens, for C from 8 to 64 in steps of 4. Where the time is flat between two widths, the narrower
saves MACs but no time: that step is the multiple worth aligning to.

    .venv/bin/python bench/channel_widths.py [--widths 8,12,...] [--rounds 12]

Writes ``bench/results/channel_widths.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def conv_pair(c: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)).eval()


def mlp(c: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default=",".join(str(w) for w in range(8, 65, 4)))
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    C.setup()
    widths = [int(w) for w in args.widths.split(",")]
    cases = {"conv3x3 16x16": lambda c: (conv_pair(c), torch.randn(1, c, 16, 16)),
             "conv3x3 8x8": lambda c: (conv_pair(c), torch.randn(1, c, 8, 8)),
             "mlp 512 tokens": lambda c: (mlp(c), torch.randn(512, c))}
    rows = []
    from rich.console import Console
    from rich.table import Table

    table = Table(title="latency (ms, median of interleaved rounds) against width")
    table.add_column("width", justify="right")
    for name in cases:
        table.add_column(name, justify="right")
    results: dict[str, dict[int, float]] = {}
    for name, build in cases.items():
        models = {}
        for c in widths:
            module, x = build(c)
            models[str(c)] = C.OrtModel(module, (x,))
        timing = C.interleaved_latency(models, rounds=args.rounds)
        results[name] = {c: timing[str(c)]["median"] for c in widths}
    for c in widths:
        table.add_row(str(c), *(f"{results[n][c]:.4f}" for n in cases))
        rows.append({"width": c, **{n: results[n][c] for n in cases}})
    Console().print(table)
    path = C.write_json("channel_widths", {"command": " ".join(sys.argv), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
