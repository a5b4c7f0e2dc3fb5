"""Teacher outputs computed once and kept on disk, so distillation runs without the teacher in memory.

When teacher and student do not fit side by side, the teacher runs once over the training batches
and its outputs go to one safetensors file per batch; training then reads them back instead of
running the teacher (Model Optimizer's Minitron recipe distils from cached teacher outputs the same
way). What is kept per batch:

- the primary output ``z`` in full, or only its top ``k`` entries per position (values and indices)
  when ``top_k`` is set: a 32k-vocabulary decoder's logits are 128 KB per token in fp32, the top 64
  about 0.5 KB. Read back, the other entries are filled with ``min(top-k) - TAIL_GAP``, so
  ``softmax(z / τ)`` gives the tail a mass of at most ``V · e^{-TAIL_GAP / τ}`` relative to the
  smallest kept entry — the top-k distribution, renormalised, to within ``1e-9`` for τ ≤ 2;
- hidden states and the embedding output when the loss reads them (``Want.hidden``).

Each file is named by a hash of the batch's input tensors, so a batch the cache has not seen (other
data, another order after a change) is an error, never another batch's teacher outputs — unless the
cache was given the teacher to fill itself (``fill_from``): then a batch it has not seen runs the
teacher once and is stored, so a run whose steps are not known in advance (a wall-clock budget)
computes each batch's outputs the first time any student meets it, and every later epoch and
student of the compile reads them back.

    cache = TeacherCache(work_dir / "teacher-cache", top_k=64)
    cache.build(teacher, train_batches, want=loss.teacher_want())
    del teacher
    trainer = DistillTrainer(student, None, "kd", config, teacher_outputs=cache.outputs)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from potstill.errors import InputError
from potstill.inputs.data import Batch, as_batch
from torch import nn

from .capture import ModelOutputs, Want, run_model

#: logit gap below the smallest kept entry for the entries top-k dropped
TAIL_GAP = 60.0


def batch_key(batch: Batch) -> str:
    """SHA-256 (first 24 hex digits) of the batch's input tensors: their names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    items = [(f"arg{i}", a) for i, a in enumerate(batch.args)] + sorted(batch.kwargs.items())
    for name, value in items:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:24]


class TeacherCache:
    """Teacher outputs by batch, as safetensors files under ``directory``."""

    def __init__(self, directory: str | Path, *, top_k: int | None = None) -> None:
        if top_k is not None and top_k < 1:
            raise InputError(f"teacher cache top_k={top_k}: give a positive number of logits to keep, or None")
        self.directory = Path(directory)
        self.top_k = top_k
        self.device = torch.device("cpu")
        self._teacher: nn.Module | None = None
        self._want = Want()
        #: batches computed on a miss (``fill_from``) and batches read back, for the run's record
        self.filled = 0
        self.hits = 0

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def fill_from(self, teacher: nn.Module, want: Want | None = None) -> None:
        """Compute and store the outputs of a batch the cache has not seen, instead of refusing it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "cache.json").write_text(json.dumps({"top_k": self.top_k, "hidden": bool(want and want.hidden)}))
        self._teacher, self._want = teacher, want or Want()

    def _store(self, teacher: nn.Module, batch: Batch, key: str, want: Want) -> None:
        from safetensors.torch import save_file

        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        teacher.eval()
        with torch.inference_mode():
            out = run_model(teacher, batch.to(device), want)
        tensors = self._pack(out)
        tmp = self._path(key).with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(self._path(key))  # a half-written file never looks stored

    def build(self, teacher: nn.Module, batches: Iterable[Any], want: Want | None = None) -> int:
        """Run ``teacher`` over ``batches`` and store its outputs; returns how many batches are stored.

        Batches already stored (same inputs) are skipped, so an interrupted build resumes.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "cache.json").write_text(json.dumps({"top_k": self.top_k, "hidden": bool(want and want.hidden)}))
        n = 0
        for raw in batches:
            batch = as_batch(raw)
            key = batch_key(batch)
            n += 1
            if not self._path(key).is_file():
                self._store(teacher, batch, key, want or Want())
        return n

    def _pack(self, out: ModelOutputs) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        if self.top_k is not None and out.logits.dim() >= 1 and out.logits.shape[-1] > self.top_k:
            values, indices = out.logits.topk(self.top_k, dim=-1)
            tensors["topk_values"], tensors["topk_indices"] = values, indices.to(torch.int32)
            tensors["vocab"] = torch.tensor([out.logits.shape[-1]])
        else:
            tensors["logits"] = out.logits
        for i, h in enumerate(out.hidden):
            tensors[f"hidden_{i}"] = h
        if out.embeddings is not None:
            tensors["embeddings"] = out.embeddings
        return tensors

    def outputs(self, batch: Batch) -> ModelOutputs:
        """The stored teacher outputs of ``batch`` (on the batch's device)."""
        from safetensors.torch import load_file

        key = batch_key(batch)
        path = self._path(key)
        if not path.is_file() and self._teacher is not None:
            self._store(self._teacher, batch, key, self._want)
            self.filled += 1
        elif path.is_file():
            self.hits += 1
        if not path.is_file():
            raise InputError(
                f"teacher cache {self.directory}: no outputs for this batch (key {key}); the training data "
                "differs from the data the cache was built on: rebuild it (TeacherCache.build)"
            )
        device = next((x.device for x in (*batch.args, *batch.kwargs.values()) if isinstance(x, torch.Tensor)),
                      self.device)  # fmt: skip
        try:
            stored = {k: v.to(device) for k, v in load_file(str(path)).items()}
        except Exception as e:  # SafetensorError (no public class), OverflowError: a damaged file
            raise InputError(
                f"teacher cache file {path} is unreadable ({type(e).__name__}: {e}); it was damaged after potstill "
                "wrote it: compile again with --no-cache, which clears the teacher cache"
            ) from e
        if "logits" in stored:
            logits = stored["logits"]
        else:
            values, indices = stored["topk_values"], stored["topk_indices"].long()
            fill = values.min(dim=-1, keepdim=True).values - TAIL_GAP
            logits = fill.expand(*values.shape[:-1], int(stored["vocab"][0])).clone()
            logits.scatter_(-1, indices, values)
        hidden = [stored[f"hidden_{i}"] for i in range(sum(k.startswith("hidden_") for k in stored))]
        return ModelOutputs(None, logits, hidden, stored.get("embeddings"))

    def __len__(self) -> int:
        return len(list(self.directory.glob("*.safetensors"))) if self.directory.is_dir() else 0


def remove_teacher_caches(root: Path, keep: str | None = None) -> int:
    """Delete the teacher caches under ``root`` except the folder named ``keep``: only folders holding
    the cache's ``cache.json`` mark, and in them only the files the cache writes (a folder that holds
    anything else stays). Returns how many files were deleted."""
    import contextlib

    if not root.is_dir() or root.is_symlink():
        return 0
    n = 0
    for folder in root.iterdir():
        if folder.name == keep or folder.is_symlink() or not (folder / "cache.json").is_file():
            continue
        for f in [*folder.glob("*.safetensors"), *folder.glob("*.tmp"), folder / "cache.json"]:
            if f.is_file() and not f.is_symlink():
                f.unlink()
                n += 1
        with contextlib.suppress(OSError):  # not empty: something else is in it; leave it
            folder.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()
    return n
