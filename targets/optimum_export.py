"""Hugging Face students through Optimum's ONNX exporter, where it supports the architecture.

``optimum.exporters.onnx.main_export`` reads a saved model directory (``hf={"dir": ..., "task":
...}``) and writes ONNX with the standard input names (``input_ids``, ``attention_mask``,
``token_type_ids``) and outputs (``last_hidden_state`` / ``logits``), batch and sequence dynamic.
When Optimum is missing or does not support the model, callers fall back to potstill's own export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .large_onnx import check_onnx, save_onnx

PRIMARY_OUTPUTS = ("logits", "last_hidden_state")


def differs_from_saved(module: Any, hf: dict[str, Any]) -> bool:
    """True when a tensor of ``module`` has another shape than in the saved model (safetensors headers).

    Optimum exports the saved teacher: for a pruned student that costs a full export and a parity
    run only to be thrown away, so callers skip it when the shapes already say it is another model.
    False when it cannot tell (no safetensors): then Optimum is tried and parity decides.
    """
    from safetensors import safe_open

    src = Path(hf.get("dir") or hf.get("path") or "")
    saved: dict[str, tuple[int, ...]] = {}
    for f in sorted(src.glob("*.safetensors")) if src.is_dir() else []:
        with safe_open(str(f), framework="pt") as handle:
            names = list(handle.keys())
            saved.update({k: tuple(handle.get_slice(k).get_shape()) for k in names})
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return any(own[k] != saved[k] for k in saved.keys() & own.keys())


def optimum_export(hf: dict[str, Any], path: Path) -> tuple[list[str], str]:
    """Export the saved HF model ``hf["dir"]`` to ``path``; returns (input names, primary output).

    Raises whatever Optimum raises when it cannot export (unsupported architecture, missing files).
    """
    import onnx
    from optimum.exporters.onnx import main_export

    src = Path(hf.get("dir") or hf.get("path") or "")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no saved Hugging Face model (config.json) to export with Optimum")
    task = hf.get("task") or "feature-extraction"
    config_states_shapes(src)
    work = Path(tempfile.mkdtemp(prefix="potstill-optimum-"))
    try:
        sink = io.StringIO()
        logging.getLogger("optimum").setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            main_export(str(src), output=str(work), task=task, device="cpu", do_validation=False,
                        trust_remote_code=False)  # never run a folder's own Python
        produced = work / "model.onnx"
        if not produced.is_file():
            raise FileNotFoundError(f"Optimum wrote no model.onnx for task '{task}'")
        model = onnx.load(str(produced))  # folds any external-data side file into one proto
        names = [i.name for i in model.graph.input]
        outputs = [o.name for o in model.graph.output]
        primary = next((o for o in PRIMARY_OUTPUTS if o in outputs), outputs[0])
        save_onnx(model, path)  # one file, or <name>.data beside it past protobuf's 2 GB
        check_onnx(path)
        return names, primary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def config_states_shapes(src: Path) -> None:
    """Raise ValueError unless the folder's config builds tensors of the saved weights' shapes.

    Optimum rebuilds the model from ``config.json``; a pruned student whose shapes the config cannot
    state would be exported wrong (or fail after a full export). The check builds the class on the
    meta device and reads only the safetensors headers, so it costs no weights.
    """
    import torch
    import transformers
    from safetensors import safe_open

    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{src}: no safetensors weights to compare with the config")
    config = transformers.AutoConfig.from_pretrained(src, trust_remote_code=False)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"{src}: config.architectures names no transformers class ({archs})")
    with torch.device("meta"):
        built = cls(config)
    expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    prefix = f"{built.base_model_prefix}." if getattr(built, "base_model_prefix", "") else ""
    for file in weights:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
                shape = tuple(f.get_slice(key).get_shape())
                want = expected.get(key, expected.get(prefix + key))
                if want is not None and want != shape:
                    raise ValueError(f"config.json cannot state the student's shapes ({key}: saved {shape}, "
                                     f"config builds {want})")
