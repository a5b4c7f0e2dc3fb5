"""Checkpoints that let an interrupted distillation resume bit-for-bit, stored as data, never code.

A checkpoint holds the students' and the loss's weights, the optimizer, scheduler and grad-scaler
states, the RNG states of torch (CPU and CUDA), NumPy and Python — one set per rank — and the
position in the data: ``step``, ``epoch`` and ``position`` (batches consumed in that epoch).
Because every epoch's data order is a function of ``(seed, epoch)``, resuming replays the epoch's
iterator up to ``position``, then restores the RNG states, and the run continues exactly as if it
had never stopped.

Format (version 2): a folder ``step-00000042/`` holding ``tensors.safetensors`` (every tensor) and
``state.json`` (everything else, with each tensor replaced by ``{"$tensor": key}``; tuples, NumPy
arrays, non-string dict keys and non-finite floats are tagged the same way so they round-trip
exactly). Neither file can run code when read: there is no pickle, so a checkpoint folder planted
by someone else can at worst hold wrong numbers. A pickled checkpoint found where checkpoints live
(``*.pt``, ``*.pkl``, ... — an older potstill wrote ``step-N.pt``) is refused with an error, never
loaded. Each folder is written atomically; the newest ``keep`` are kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from potstill.errors import InputError
from potstill.outputs.atomic import atomic_path
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT = 2
STATE, TENSORS = "state.json", "tensors.safetensors"
_NAME = re.compile(r"step-(\d+)$")
_PICKLES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


# -- RNG --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# -- encoding: a tree of Python values + tensors -> JSON + a flat tensor dict ------------------------


def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``obj`` with its tensors moved into ``tensors`` (see the module doc)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # a private contiguous copy: safetensors refuses shared or strided storage
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return encode(obj.item(), tensors)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, tuple):
        return {"$tuple": [encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: encode(v, tensors) for k, v in obj.items()}
        return {"$dict": [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(
        f"checkpoint: cannot store a {type(obj).__name__} as data (only tensors, arrays and JSON values)"
    )


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$tensor" in obj:
        return tensors[obj["$tensor"]]
    if "$ndarray" in obj:
        return np.asarray(obj["$ndarray"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    if "$float" in obj:
        return float(obj["$float"])
    if "$tuple" in obj:
        return tuple(decode(v, tensors) for v in obj["$tuple"])
    if "$dict" in obj:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in obj["$dict"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# -- files ------------------------------------------------------------------------------------------


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}"


def refuse_pickles(directory: Path | None) -> None:
    """InputError when a pickled checkpoint lies where potstill keeps checkpoints."""
    if directory is None or not Path(directory).is_dir():
        return
    pickles = sorted(
        p.name for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in _PICKLES
    )
    if pickles:
        raise InputError(
            f"{directory}: holds pickled checkpoint file(s) {pickles}; potstill never unpickles checkpoints "
            "(unpickling can run any code) and reads only safetensors + JSON step folders. If these are from an "
            "older potstill, delete them and the distillation starts from scratch."
        )


def list_checkpoints(directory: Path | None) -> list[Path]:
    if directory is None or not Path(directory).is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in Path(directory).iterdir()
        if (m := _NAME.fullmatch(p.name)) and p.is_dir() and (p / STATE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Path | None) -> Path | None:
    refuse_pickles(directory)
    found = list_checkpoints(directory)
    return found[-1] if found else None


def remove_checkpoints(directory: Path | None) -> None:
    """Delete the step folders potstill wrote in ``directory`` (nothing else)."""
    for path in list_checkpoints(directory):
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep: int = 1) -> Path:
    """Write ``payload`` atomically as ``step-NNNNNNNN/``; drop all but the newest ``keep``."""
    tensors: dict[str, torch.Tensor] = {}
    state = {"format": FORMAT, "payload": encode(payload, tensors)}
    path = checkpoint_path(directory, step)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / TENSORS).write_bytes(save_tensors(tensors))
        # allow_nan=False: non-finite floats are tagged, so the file stays standard JSON
        (tmp / STATE).write_text(json.dumps(state, allow_nan=False), encoding="utf-8")
    for old in list_checkpoints(directory)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint folder; InputError (naming the file) when it is not potstill's format."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(
            f"{path / STATE}: not a readable checkpoint state ({e}); delete {path} to start over"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(
            f"{path / STATE}: not a potstill checkpoint of format {FORMAT}; delete {path} to start over"
        )
    try:
        tensors = load_tensors((path / TENSORS).read_bytes())
    except (OSError, SafetensorError) as e:
        raise InputError(
            f"{path / TENSORS}: not a safetensors file ({e}); potstill reads checkpoints only as safetensors "
            f"and never unpickles them: delete {path} to start over"
        ) from None
    try:
        return decode(state["payload"], tensors)  # type: ignore[no-any-return]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(
            f"{path}: the checkpoint's state and tensors do not match ({e}); delete {path}"
        ) from None


def fingerprint(parts: Iterable[Any]) -> str:
    """sha256 over JSON values and the bytes of tensors / modules' state: what a run started from."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.nn.Module):
            part = part.state_dict()
        if isinstance(part, dict) and all(isinstance(v, torch.Tensor) for v in part.values()):
            for k, v in part.items():
                h.update(k.encode())
                h.update(str(v.dtype).encode() + str(tuple(v.shape)).encode())
                h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()
