"""OUT is marked, locked and swapped atomically; killed runs are recovered; foreign folders are kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from potstill.errors import InputError
from potstill.outputs.outdir import MARK, OutputFolder, inside, read_mark


def _compile(out: Path, text: str, **kw: bool) -> OutputFolder:
    folder = OutputFolder(out, **kw)
    with folder as tmp:
        (tmp / "result.txt").write_text(text)
        (tmp / "students").mkdir()
        (tmp / "students" / "s0.bin").write_bytes(b"\0" * 10)
    return folder


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name and not p.name.endswith(".lock"))


def test_fresh_output_is_marked_and_nothing_left_beside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = _compile(out, "one")
    mark = read_mark(out)
    assert mark is not None and mark["run_id"] == folder.run_id and mark["state"] == "complete"
    assert mark["potstill_version"] and mark["created"]
    assert (out / "result.txt").read_text() == "one"
    assert _siblings(out) == []


def test_second_run_replaces_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _compile(out, "one")
    second = _compile(out, "two")
    assert (out / "result.txt").read_text() == "two"
    assert read_mark(out)["run_id"] == second.run_id  # type: ignore[index]
    assert _siblings(out) == []


def test_error_in_the_block_leaves_out_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _compile(out, "one")
    with pytest.raises(RuntimeError), OutputFolder(out) as tmp:
        (tmp / "result.txt").write_text("half")
        raise RuntimeError("pass failed")
    assert (out / "result.txt").read_text() == "one"
    assert _siblings(out) == []


def test_foreign_folder_is_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    (out / "manifest.json").write_text("{}")  # a manifest alone does not make it potstill's
    with pytest.raises(InputError, match=r"no \.potstill mark.*--force"):
        OutputFolder(out).preflight()
    with pytest.raises(InputError, match="--force"), OutputFolder(out):
        pass
    assert (out / "thesis.tex").read_text() == "precious"
    assert _siblings(out) == []


def test_foreign_folder_replaced_with_force(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "old.txt").write_text("x")
    _compile(out, "new", force=True)
    assert sorted(p.name for p in out.iterdir()) == [MARK, "result.txt", "students"]


def test_empty_existing_folder_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    _compile(out, "x")
    assert read_mark(out) is not None


def test_symlink_out_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(InputError, match="symbolic link"):
        OutputFolder(tmp_path / "link").preflight()


def test_file_out_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        OutputFolder(tmp_path / "f").preflight()


def test_cwd_and_above_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path), "/"):
        with pytest.raises(InputError, match="working folder or above"):
            OutputFolder(out, force=True).preflight()


def test_unwritable_parent_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        parent = Path("/sys")  # root ignores file modes; sysfs refuses new entries even to root
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
    with pytest.raises(InputError, match="cannot write"):
        OutputFolder(parent / "potstill-out").preflight()


def test_planted_lock_link_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / ".out.lock").symlink_to(victim)
    with pytest.raises(InputError, match=r"lock file .* is a symbolic link"), OutputFolder(tmp_path / "out"):
        pass
    assert victim.read_text() == "keep me" and not (tmp_path / "out").exists()


def test_inside_accepts_paths_under_out(tmp_path: Path) -> None:
    (tmp_path / "students" / "s0").mkdir(parents=True)
    assert inside(tmp_path, "students/s0") == (tmp_path / "students" / "s0").resolve()
    assert inside(tmp_path, "students/../students/s0") == (tmp_path / "students" / "s0").resolve()


@pytest.mark.parametrize("rel", ["/etc", "..", "../x", "students/../../x", "", ".", 3, None])
def test_inside_refuses_tampered_paths(tmp_path: Path, rel: object) -> None:
    with pytest.raises(InputError, match="manifest"):
        inside(tmp_path / "out", rel)  # type: ignore[arg-type]


def test_inside_refuses_symlink_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "students").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (out / "students" / "s0").symlink_to(tmp_path / "secret")
    with pytest.raises(InputError, match="outside"):
        inside(out, "students/s0")


# -- other processes: the lock and kills ----------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import potstill.outputs.outdir as od

    out, mode, arg = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode == "kill":
        def checkpoint(step):
            if step == arg:
                os.kill(os.getpid(), signal.SIGKILL)
        od._checkpoint = checkpoint
    with od.OutputFolder(out) as tmp:
        (tmp / "result.txt").write_text("new")
        if mode == "kill" and arg == "writing":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "hold":
            print("locked", flush=True)
            sys.stdin.readline()  # hold the lock until the parent says go
    print("done", flush=True)
    """
)


def _child(out: Path, mode: str, arg: str = "") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(out), mode, arg],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("step", ["writing", "start", "marked", "aside", "swapped"])
def test_kill_at_each_step_of_the_swap_is_recovered(tmp_path: Path, step: str) -> None:
    out = tmp_path / "out"
    _compile(out, "old")
    proc = _child(out, "kill", step)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # the kill never loses both: OUT, or its copy moved aside, is whole
    survivors = [p for p in [out, *tmp_path.glob(".out.*.old")] if (p / "result.txt").exists()]
    assert survivors, f"killed at {step}: both copies lost"
    assert any(s.name.endswith(".tmp") for s in _siblings_paths(out)) or step in ("aside", "swapped")
    # the next run recovers, cleans, and succeeds
    folder = OutputFolder(out)
    with folder as tmp:
        # recovery ran: OUT is back (old, or new when the kill came after the swap) and nothing is left
        expected = "new" if step == "swapped" else "old"
        assert (out / "result.txt").read_text() == expected
        assert [p.name for p in _siblings_paths(out)] == [tmp.name]
        (tmp / "result.txt").write_text("third")
    assert (out / "result.txt").read_text() == "third"
    assert _siblings(out) == []


def _siblings_paths(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name != out.name and not p.name.endswith(".lock")]


def test_kill_while_deleting_the_old_copy_is_cleaned(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _compile(out, "old")
    # the state a kill inside remove_marked leaves: an aside copy, partly deleted, still marked
    proc = _child(out, "kill", "swapped")
    proc.wait(timeout=60)
    (aside,) = tmp_path.glob(".out.*.old")
    (aside / "students" / "s0.bin").unlink()
    _compile(out, "next")
    assert not aside.exists()


def test_unmarked_leftover_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stray = tmp_path / ".out.20260101T000000-deadbeef.tmp"
    stray.mkdir()
    (stray / "user.txt").write_text("not potstill's")
    empty = tmp_path / ".out.20260101T000001-deadbeef.tmp"
    empty.mkdir()
    other = tmp_path / ".out.backup"
    other.mkdir()
    folder = _compile(out, "x")
    assert (stray / "user.txt").exists() and other.exists()
    assert not empty.exists()
    assert any("lacks potstill's mark" in n for n in folder.notes)


def test_two_processes_one_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = _child(out, "hold")
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline().strip() == "locked"
    try:
        with (
            pytest.raises(InputError, match=rf"another potstill compile \(pid {holder.pid}\)"),
            OutputFolder(out),
        ):
            pass
        # the holder's temporary folder is not a stale leftover: a refused run must not touch it
        assert len(list(tmp_path.glob(".out.*.tmp"))) == 1
    finally:
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "done"
        holder.wait(timeout=60)
    assert (out / "result.txt").read_text() == "new"
    # the lock died with its holder: the next run gets it
    _compile(out, "after")
    assert (out / "result.txt").read_text() == "after"


def test_lock_of_a_killed_holder_is_free(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = _child(out, "hold")
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    time.sleep(0.05)
    _compile(out, "mine")
    assert (out / "result.txt").read_text() == "mine"
    assert json.loads((out / MARK).read_text())["state"] == "complete"
    assert _siblings(out) == []


def test_atomic_path_replaces_a_folder_by_renaming_it_aside(tmp_path: Path) -> None:
    from potstill.outputs.atomic import atomic_path

    target = tmp_path / "model.dir"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_bytes(b"new")
        assert (target / "old.bin").exists()  # the old copy stays until the new one is complete
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.dir"]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        raise RuntimeError
    assert (target / "new.bin").exists()
