"""Atomic writes: write to a temporary sibling, then rename, so nothing half-written is left."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, else remove it.

    Works for files and directories: whatever the body creates at the temporary path is moved.
    A folder already at ``path`` is first renamed aside into the temporary folder, never deleted
    before the new one is in place, so a kill between the steps leaves one whole copy.
    (``potstill.outputs.outdir`` does the same for OUT, with ownership marks and a lock.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    target = tmp / path.name
    try:
        yield target
        if target.exists():
            if target.is_dir():
                os.chmod(target, 0o777 & ~_umask())
            if path.is_dir() and not path.is_symlink():
                os.rename(path, tmp / ".old")  # rename(2) cannot replace a non-empty folder
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
