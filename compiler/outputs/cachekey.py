"""What a cached student depends on, as one hash, and the hashes of what it left on disk.

The key covers: the teacher's weights; the source of every local module the compile imported
(the teacher file and whatever it imports from its own folder, data files, plugins), found by
walking ``sys.modules`` after import; the content of the calibration and training batches;
the profile, target, seed and input shapes; and the versions of potstill and its libraries. A
student's key adds its pipeline. Each cached student's files are hashed (sha256) into the
manifest and checked before reuse: a truncated or edited file means a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from potstill.inputs.data import as_batch
from potstill.outputs.manifest import sha256_file, to_jsonable, versions

_IGNORED = {"__pycache__"}


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(root == path or root in path.parents for root in roots)


def local_sources(files: Iterable[str | Path], extra: Iterable[str | Path] = ()) -> dict[str, str]:
    """``{path: sha256}`` of ``files`` and of every imported module whose file lies in one of
    their folders (the teacher's local helpers); site-packages and potstill itself are left out."""
    given = [Path(f).resolve() for f in files if Path(f).is_file()]
    roots = sorted({f.parent for f in given})
    skip = [Path(p).resolve() for p in sys.path if "site-packages" in p or "dist-packages" in p]
    skip.append(Path(__file__).resolve().parent)
    found = set(given) | {Path(f).resolve() for f in extra if Path(f).is_file()}
    for key, module in list(sys.modules.items()):
        name = getattr(module, "__file__", None)
        if key.startswith("__"):  # __main__, __mp_main__: the running script is the tool, not an input
            continue
        if not name:
            continue
        path = Path(name).resolve()
        if path.suffix == ".py" and path.is_file() and _under(path, roots) and not _under(path, skip):
            found.add(path)
    return {str(p): sha256_file(p) for p in sorted(found)}


def batches_sha256(batches: Iterable[Any]) -> str:
    """One hash of every tensor (dtype, shape, values) and value in the batches, in order."""
    h = hashlib.sha256()
    for raw in batches:
        b = as_batch(raw)
        for x in [*b.args, *(v for _, v in sorted(b.kwargs.items())), b.target]:
            if isinstance(x, torch.Tensor):
                t = x.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                h.update(repr(x).encode())
    return h.hexdigest()


def cache_key(inputs: dict[str, Any], profile: Any, target: str) -> str:
    """Hash of everything a student depends on besides its own pipeline."""
    keyed = {k: v for k, v in inputs.items() if k not in ("ratios", "pipelines", "cache_key")}
    blob = json.dumps(to_jsonable([keyed, profile, target, versions()]), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_key(base_key: str, spec: str) -> str:
    return hashlib.sha256(f"{base_key}|{spec}".encode()).hexdigest()


def artifact_hashes(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under a student's folder."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not _IGNORED & set(p.parts)}  # fmt: skip
