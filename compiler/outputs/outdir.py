"""The output folder: marked, locked, and replaced atomically.

potstill replaces ``OUT`` whole at the end of a compile. Three rules make that safe:

* **Ownership.** Every folder potstill writes carries a ``.potstill`` mark (JSON: tool, run id,
  potstill version, created, state). A folder without it is the user's: potstill refuses to replace
  it unless ``force=True`` (``--force``), and never deletes a leftover that lacks the mark.
* **Exclusion.** An exclusive ``fcntl.flock`` on ``.OUT.lock`` beside ``OUT`` admits one compile at
  a time; the kernel drops the lock when its holder dies, so a killed run never blocks the next.
  The holder unlinks the file before it lets go, so no lock file stays beside ``OUT``; a run that
  opened the file just before the unlink then holds a lock on an orphaned inode, sees that the path
  no longer names the inode it locked (``stat`` against ``fstat``), and opens the file afresh.
* **Work area.** ``.OUT.work`` holds what lets a killed or failed run resume (distillation
  checkpoints, the teacher-output cache). A failed run keeps it and says so; a run that succeeds
  deletes it; a work area with nothing to resume from is removed.
* **Atomic swap.** The run writes into a sibling ``.OUT.<run>.tmp``. :meth:`OutputFolder.commit`
  then (1) marks the temporary folder complete, (2) renames ``OUT`` aside to ``.OUT.<run>.old``,
  (3) renames the temporary folder to ``OUT``, (4) deletes the aside folder, its mark last. Each
  rename is atomic (POSIX ``rename(2)``), so at every instant ``OUT`` or its aside copy is whole. The
  next run, under the lock, recovers a kill between any two steps: if ``OUT`` is missing it renames
  the aside copy back (the killed run never reported success), then deletes marked leftovers.

Example::

    folder = OutputFolder(Path("out"), force=False)
    folder.preflight()                  # cheap checks before any heavy work
    with folder as tmp:                 # locked; tmp is a fresh, marked sibling folder
        (tmp / "manifest.json").write_text("{}")
        folder.commit()                 # optional: leaving the block without an error commits

:func:`inside` resolves a path read from a manifest and refuses one that leaves ``OUT``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from potstill._version import __version__
from potstill.errors import InputError
from potstill.outputs.atomic import atomic_write_json

MARK = ".potstill"
"""Name of the ownership mark inside every folder potstill writes."""

#: what a run writes into ``.OUT.work`` that the next run rebuilds anyway: the record of its plans
#: (the driver) and the teacher's scratch engine (``record.teacher``)
WORK_SCRATCH = ("run.json", "teacher-engine")

_RUN_ID = r"\d{8}T\d{6}-[0-9a-f]{8}"


def new_run_id() -> str:
    """A sortable, unique run id: UTC time and 32 random bits, e.g. ``20261201T123456-1a2b3c4d``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def read_mark(folder: Path) -> dict[str, Any] | None:
    """The folder's ``.potstill`` mark, or None when it has none (or one that is not potstill's)."""
    try:
        mark = json.loads((folder / MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(mark, dict)
        or mark.get("tool") != "potstill"
        or not isinstance(mark.get("run_id"), str)
    ):
        return None
    return mark


def write_mark(folder: Path, run_id: str, state: str) -> None:
    atomic_write_json(
        folder / MARK,
        {
            "tool": "potstill",
            "run_id": run_id,
            "potstill_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "state": state,
        },
    )


def _fsync_dir(folder: Path) -> None:
    # a rename is durable only once the directory holding it is flushed
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_marked(folder: Path) -> None:
    """Delete a folder potstill wrote, the mark last, so a kill midway leaves it still marked."""
    for child in folder.iterdir():
        if child.name == MARK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    with contextlib.suppress(FileNotFoundError):
        (folder / MARK).unlink()
    folder.rmdir()


def _checkpoint(step: str) -> None:
    """Called between the steps of :meth:`OutputFolder.commit`; tests patch it to kill the process."""


class OutputFolder:
    """``OUT`` of one compile: preflight checks, the lock, a temporary sibling and the atomic swap.

    ``with OutputFolder(out) as tmp:`` locks ``OUT``, cleans what killed runs left, and yields a
    fresh temporary folder to write into. Leaving the block normally (or calling :meth:`commit`)
    swaps it in; leaving it by an exception removes it and leaves ``OUT`` untouched.
    """

    def __init__(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        self.path = Path(path)
        self.force = force
        self.run_id = new_run_id()
        self.notes: list[str] = []
        """Things a user should hear about (leftovers kept because they lack the mark, recoveries)."""
        self._lock_fd: int | None = None
        self._tmp: Path | None = None
        self._committed = False

    # -- names beside OUT ------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock"

    @property
    def work_dir(self) -> Path:
        """A stable work area beside ``OUT`` that survives killed runs (checkpoints, caches)."""
        return self.path.parent / f".{self.path.name}.work"

    def _sibling(self, run_id: str, kind: str) -> Path:
        return self.path.parent / f".{self.path.name}.{run_id}.{kind}"

    def _leftover_pattern(self) -> re.Pattern[str]:
        return re.compile(rf"\.{re.escape(self.path.name)}\.({_RUN_ID})\.(tmp|old)")

    # -- checks --------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Raise InputError for an OUT potstill must not or cannot replace; touches nothing."""
        out = self.path
        flag = f"-o {out}"
        resolved, cwd = out.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise InputError(
                f"{flag}: is the working folder or above it; potstill replaces OUT whole, give a new folder"
            )
        if out.is_symlink():
            raise InputError(
                f"{flag}: is a symbolic link (to {os.readlink(out)}); potstill replaces OUT whole and will not "
                "follow a link: give the real folder or a new one"
            )
        if out.exists() and not out.is_dir():
            raise InputError(f"{flag}: exists and is not a folder; give a new folder")
        self._check_writable()
        if out.is_dir() and any(out.iterdir()) and read_mark(out) is None and not self.force:
            hint = (
                " (it has a manifest.json: an output of an older potstill?)"
                if (out / "manifest.json").exists()
                else ""
            )
            raise InputError(
                f"{flag}: the folder has files but no {MARK} mark, so potstill did not write it{hint}; potstill "
                "replaces OUT whole: give a new folder, or pass --force (force=True) to replace it and everything in it"
            )

    def _check_writable(self) -> None:
        # os.access lies for root and on some mounts: probe by creating a file where the swap will
        ancestor = self.path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        try:
            fd, probe = tempfile.mkstemp(dir=ancestor, prefix=f".{self.path.name}.", suffix=".probe")
        except OSError as e:
            raise InputError(
                f"-o {self.path}: cannot write in {ancestor} ({e.strerror}); give a folder you can write to"
            ) from None
        os.close(fd)
        os.unlink(probe)
        if self.path.is_dir() and not os.access(self.path, os.W_OK | os.X_OK):
            raise InputError(
                f"-o {self.path}: the folder is not writable, so potstill cannot replace it; fix its permissions or give another folder"
            )

    # -- lock ------------------------------------------------------------------------------------
    def _lock(self) -> None:
        for _ in range(100):  # another run unlinked the file between our open and our flock: retry
            fd = self._lock_once()
            if self._names_locked_file(fd):
                before = os.pread(fd, 64, 0).strip()
                if before and not before.isdigit():  # potstill writes only its pid here
                    os.close(fd)
                    raise InputError(f"-o {self.path}: {self.lock_path} holds text potstill did not write; it is "
                                     "potstill's lock file name: move that file away and run again")
                self._lock_fd = fd
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return
            os.close(fd)
        raise InputError(f"-o {self.path}: the lock file {self.lock_path} keeps changing under potstill; "
                         "another program is replacing it: stop it and run again")

    def _names_locked_file(self, fd: int) -> bool:
        """True when the lock path still names the inode ``fd`` holds (not unlinked by its last holder)."""
        try:
            st = os.stat(self.lock_path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

    def _lock_once(self) -> int:
        """Open the lock file and take its lock (without waiting); InputError naming the holder."""
        try:
            # O_NOFOLLOW: a planted link must not make potstill write its pid into another file
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise InputError(
                f"-o {self.path}: the lock file {self.lock_path} is a symbolic link; potstill did not make it: "
                "remove it and run again"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise InputError(
                f"-o {self.path}: another potstill compile (pid {holder}) is writing this folder; "
                "wait for it to finish or give another -o"
            ) from None
        return fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            # unlink while still holding the lock (a run that locks the orphan retries: see _lock)
            if self._names_locked_file(self._lock_fd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lock_path)
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def keep_work_after_failure(self) -> str | None:
        """After a failed run: the console line saying ``.OUT.work`` is kept for a resume, or None when
        it held nothing to resume from (then the scratch potstill wrote there, and the folder, go)."""
        work = self.work_dir
        if not work.is_dir() or work.is_symlink():
            return None
        for name in WORK_SCRATCH:  # rebuilt by every run: nothing to resume from
            entry = work / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.is_file():
                entry.unlink()
        for entry in work.iterdir():  # empty folders (a checkpoints folder with no checkpoint yet)
            if entry.is_dir() and not entry.is_symlink() and not any(entry.iterdir()):
                entry.rmdir()
        kept = sorted(p.name for p in work.iterdir())
        if not kept:
            work.rmdir()
            return None
        return (f"note: kept {work} ({', '.join(kept[:4])}): the next compile into {self.path} resumes from it; "
                "delete it to start afresh (a compile that succeeds deletes it)")

    # -- recovery ------------------------------------------------------------------------------
    def recover(self) -> None:
        """Undo what killed runs left beside OUT (call with the lock held).

        OUT missing but an aside copy present (killed between the two renames) -> rename it back.
        Then delete every marked ``.OUT.<run>.tmp``/``.old`` leftover; unmarked ones are kept and noted.
        """
        pattern = self._leftover_pattern()
        leftovers: list[tuple[str, str, Path]] = []
        for entry in self.path.parent.iterdir():
            m = pattern.fullmatch(entry.name)
            if m and entry.is_dir() and not entry.is_symlink():
                leftovers.append((m.group(1), m.group(2), entry))
        leftovers.sort()
        if not self.path.exists():
            asides = [p for run, kind, p in leftovers if kind == "old" and read_mark(p) is not None]
            if asides:
                os.rename(asides[-1], self.path)
                _fsync_dir(self.path.parent)
                self.notes.append(
                    f"{self.path}: restored the previous output that a killed run had moved aside"
                )
        for _run, _kind, entry in leftovers:
            if not entry.exists():
                continue
            if read_mark(entry) is not None:
                remove_marked(entry)
            elif not any(entry.iterdir()):
                entry.rmdir()  # a killed run's folder before its mark was written (or after it was removed)
            else:
                self.notes.append(
                    f"kept {entry}: named like a potstill leftover but it lacks potstill's mark"
                )

    # -- the swap ------------------------------------------------------------------------------
    def __enter__(self) -> Path:
        self.preflight()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.recover()
            self.preflight()  # a recovery may have put OUT back
            tmp = self._sibling(self.run_id, "tmp")
            tmp.mkdir()
            write_mark(tmp, self.run_id, "writing")
            self._tmp = tmp
        except BaseException:
            self._unlock()
            raise
        return tmp

    def commit(self) -> Path:
        """Swap the temporary folder in as OUT (idempotent); returns OUT."""
        if self._committed:
            return self.path
        if self._tmp is None:
            raise RuntimeError("OutputFolder.commit() outside its with-block")
        out, tmp = self.path, self._tmp
        _checkpoint("start")
        write_mark(tmp, self.run_id, "complete")
        _checkpoint("marked")
        aside = self._sibling(self.run_id, "old")
        old_exists = out.exists()
        if old_exists:
            if read_mark(out) is None:
                # a forced, foreign OUT: adopt it so a kill below leaves a copy the next run recognises
                write_mark(out, self.run_id, "replaced")
            os.rename(out, aside)
            _fsync_dir(out.parent)
        _checkpoint("aside")
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        self._committed = True
        _checkpoint("swapped")
        if old_exists:
            remove_marked(aside)
        _checkpoint("done")
        return out

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self.commit()
            elif not self._committed and self._tmp is not None and self._tmp.exists():
                remove_marked(self._tmp)
        finally:
            self._unlock()


def inside(out: Path, rel: str) -> Path:
    """Resolve ``rel``, a path read from OUT's manifest, under ``out``; InputError if it leaves OUT.

    Absolute paths, ``..`` that climbs out, and symlinks that point out are all refused: a tampered
    manifest must not make potstill read or copy files elsewhere.

    >>> inside(Path("/tmp/out"), "students/s0").as_posix()
    '/tmp/out/students/s0'
    """
    where = f"{out / 'manifest.json'}"
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise InputError(
            f"{where}: path {rel!r} is not a relative path; the manifest is corrupt, delete {out} and compile again"
        )
    if Path(rel).is_absolute():
        raise InputError(
            f"{where}: path {rel!r} is absolute, outside {out}; the manifest was edited, delete {out} and compile again"
        )
    root = out.resolve()
    target = (root / rel).resolve()
    if target == root or root not in target.parents:
        raise InputError(
            f"{where}: path {rel!r} resolves to {target}, outside {out}; the manifest was edited (or a link points out), delete {out} and compile again"
        )
    return target
