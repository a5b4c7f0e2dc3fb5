"""Fault injection for what goes in and what stays beside OUT: corrupt Hugging Face folders, a too long
--sequence-length, auto_map with a known model_type, NaN calibration data, a damaged teacher cache,
the lock file and the work area of a failed run, corpora in the memory estimate and --ratio's
achieved reductions. Each row of docs/fault-injection.md is one of these tests (or one in
test_faults.py). A tiny BERT folder or MLP teacher keeps each compile to seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from potstill.errors import InputError
from potstill.inputs.teacher import load_teacher
from potstill.pipeline import Pass

from tests.compiler.test_faults import run_cli, tiny

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT classifier with 64 positions and a tokenizer, saved by save_pretrained."""
    base = tmp_path_factory.mktemp("hf")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(base / "bert")
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "small", "model", "runs", "fast"]
    (base / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(base / "vocab.txt")).save_pretrained(base / "bert")
    return base / "bert"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


#: (file, how it is damaged) -> the bytes written instead
DAMAGE: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "truncated weights": ("model.safetensors", lambda b: b[:1000]),
    "weights cut in the data": ("model.safetensors", lambda b: b[:-64]),
    "random weights": ("model.safetensors", lambda b: os.urandom(4096)),
    "empty weights": ("model.safetensors", lambda b: b""),
    "config cut short": ("config.json", lambda b: b[:40]),
    "config with a bad value": ("config.json", lambda b: json.dumps({**json.loads(b), "num_hidden_layers": "x"}).encode()),
    "tokenizer.json cut short": ("tokenizer.json", lambda b: b[:30]),
    "tokenizer_config.json garbage": ("tokenizer_config.json", lambda b: b"\x00\xff garbage"),
    "tokenizer.json of another shape": ("tokenizer.json", lambda b: b'{"model": 1}'),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGE))
def test_corrupt_hf_file_is_named_with_its_fix(bert_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              case: str) -> None:  # fmt: skip
    name, damage = DAMAGE[case]
    folder = _copy(bert_folder, tmp_path / "bert")
    (folder / name).write_bytes(damage((folder / name).read_bytes()))
    code, _, err = run_cli(["compile", f"hf:{folder}", "--no-teacher-timing", "-o", str(tmp_path / "out")], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert str(folder / name) in err or (name.startswith("tokenizer") and f"the tokenizer in {folder}" in err)
    fix = {"model.safetensors": "save_pretrained the model again", "config.json": "config.json",
           "tokenizer.json": "tokenizer.save_pretrained", "tokenizer_config.json": "tokenizer.save_pretrained"}[name]
    assert fix in err
    assert not (tmp_path / "out").exists()


def test_sequence_length_past_the_positions_names_the_flag_and_the_max(bert_folder: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    code, _, err = run_cli(["compile", f"hf:{bert_folder}", "--sequence-length", "4096", "-o", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "--sequence-length 4096" in err and "at most 64 token positions" in err
    assert "'max_position_embeddings' = 64" in err and "--input-shape" not in err
    t = load_teacher(f"hf:{bert_folder}", sequence_length=64)  # the max itself is fine
    assert t.example_kwargs["input_ids"].shape == (1, 64)


def test_auto_map_with_a_known_model_type_says_the_builtin_class_is_used(bert_folder: Path, tmp_path: Path) -> None:
    folder = _copy(bert_folder, tmp_path / "bert")
    (folder / "remote.py").write_text("from pathlib import Path\nPath(__file__).with_name('RAN').write_text('x')\n")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "remote.Model"}}))
    lines: list[str] = []
    t = load_teacher(f"hf:{folder}", note=lines.append)
    assert type(t.module) is transformers.BertForSequenceClassification and not (folder / "RAN").exists()
    (note,) = [line for line in lines if "auto_map" in line]
    assert "built-in 'bert' classes" in note and "ignores that code" in note and "--trust-remote-code" in note
    lines.clear()
    load_teacher(f"hf:{bert_folder}", note=lines.append)  # no auto_map: no note
    assert not [line for line in lines if "auto_map" in line]
    # --help says what happens, not "refused" for every auto_map folder
    help_text = subprocess.run([sys.executable, "-m", "potstill", "compile", "--help"], capture_output=True, text=True,
                               cwd=REPO, check=True).stdout  # fmt: skip
    flat = " ".join(help_text.split())
    assert "built with its own class, said on the console" in flat and "unknown one is refused" in flat


NAN_CALIB = '''
def calib_data():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 8, generator=g) for _ in range(4)]
    batches[2][1, 3] = float("{value}")
    return batches
'''


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_calibration_batch_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    teacher = tiny(tmp_path, extra=NAN_CALIB.format(value=value))  # replaces the file's calib_data()
    code, _, err = run_cli(["compile", teacher, "-o", str(tmp_path / "out")], capsys)
    assert code == 2, err
    assert "calibration data (calib_data() in the teacher file): batch 2 of 4 holds NaN or infinite values in args[0]" in err


FAILING = '''
from dataclasses import dataclass
from pathlib import Path
from potstill.errors import PotstillError
from potstill.pipeline import function_pass


@dataclass(frozen=True)
class FailOptions:
    #: write a checkpoint into the work area before failing
    checkpoint: bool = False


@function_pass("my.fail", options=FailOptions)
def fail(state, opts):
    """Fail after (optionally) leaving a distillation checkpoint behind (a test pass)."""
    if opts.checkpoint:
        folder = Path(state.work_dir) / "checkpoints" / state.working().name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "step-1.pt").write_bytes(b"checkpoint")
    raise PotstillError("my.fail: failing on purpose")
'''


def test_lock_is_removed_and_a_failed_runs_work_area_is_kept_only_with_something_to_resume(
    registry: dict[str, type[Pass]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher, out = tiny(tmp_path), tmp_path / "out"
    lock, work = tmp_path / ".out.lock", tmp_path / ".out.work"
    code, _, err = run_cli(["compile", teacher, "-o", str(out)], capsys)
    assert code == 0, err
    assert not lock.exists() and not work.exists()
    plugin = tmp_path / "failing.py"
    plugin.write_text(FAILING)
    base = ["compile", teacher, "--plugin", str(plugin), "-o", str(out), "--pipeline"]
    code, printed, err = run_cli([*base, "prune.width{ratio=0.5},my.fail"], capsys)
    assert code == 2 and "failing on purpose" in err
    assert not lock.exists() and not work.exists()  # nothing to resume from: nothing stays
    assert "kept" not in printed + err
    code, printed, err = run_cli([*base, "prune.width{ratio=0.5},my.fail{checkpoint=true}"], capsys)
    assert code == 2 and not lock.exists()
    assert (work / "checkpoints").is_dir()
    assert f"kept {work} (checkpoints)" in printed + err and "resumes from it" in printed + err


def test_a_run_that_locks_an_unlinked_lock_file_locks_afresh(tmp_path: Path) -> None:
    import fcntl

    from potstill.outputs.outdir import OutputFolder

    first, second = OutputFolder(tmp_path / "out"), OutputFolder(tmp_path / "out")
    with first:
        late = os.open(first.lock_path, os.O_RDWR)  # opened while the first run holds the lock
    assert not first.lock_path.exists()
    fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the orphaned inode locks: it must not count
    assert not second._names_locked_file(late)
    with second:
        assert second._names_locked_file(second._lock_fd or -1)
        assert first.lock_path.read_text().strip() == str(os.getpid())
    os.close(late)
    foreign = OutputFolder(tmp_path / "mine")
    foreign.lock_path.write_text("my notes\n")
    with pytest.raises(InputError, match="holds text potstill did not write"), foreign:
        pass
    assert foreign.lock_path.read_text() == "my notes\n"


def test_damaged_teacher_cache_file_names_the_file_and_no_cache_clears_only_its_files(
    registry: dict[str, type[Pass]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from potstill.inputs.data import as_batch
    from potstill.passes.distill.teacher_cache import TeacherCache

    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    batch = torch.randn(2, 8)
    root = tmp_path / ".out.work" / "teacher-cache"  # one cache per teacher and data, shared by the students
    cache = TeacherCache(root / "0123456789abcdef")
    assert cache.build(model, [batch]) == 1
    (stored,) = cache.directory.glob("*.safetensors")
    stored.write_bytes(b"\xff" * 8 + stored.read_bytes()[8:])
    with pytest.raises(InputError) as info:
        cache.outputs(as_batch(batch))
    assert str(stored) in str(info.value) and "--no-cache" in str(info.value)
    mine = root / "0123456789abcdef" / "my-notes.txt"
    mine.write_text("keep me")
    plugin = tmp_path / "failing.py"
    plugin.write_text(FAILING)  # a run that fails after the work area is set up: the work area stays to look at
    code, printed, err = run_cli(["compile", tiny(tmp_path), "--no-cache", "--plugin", str(plugin), "-o",
                                  str(tmp_path / "out"), "--pipeline", "my.fail"], capsys)  # fmt: skip
    assert code == 2
    assert "--no-cache: cleared the teacher-output cache" in printed + err
    assert not stored.exists() and not (cache.directory / "cache.json").exists()
    assert mine.read_text() == "keep me"


def test_corpora_count_in_the_memory_estimate_at_their_streamed_cap(tmp_path: Path) -> None:
    from potstill.inputs.corpus import MAX_CORPUS_BYTES
    from potstill.inputs.memory import corpus_bytes, preflight_memory

    huge = tmp_path / "huge.txt"
    with huge.open("wb") as f:  # 1 GB, sparse: no disk used
        f.truncate(2**30)
    small = tmp_path / "small.txt"
    small.write_text("one sentence.\n" * 10)
    assert corpus_bytes([str(huge)]) == 2 * MAX_CORPUS_BYTES  # streamed: its cap, not its size
    assert corpus_bytes([str(small), None, "data.py:batches"]) == 2 * small.stat().st_size
    lines: list[str] = []
    est = preflight_memory(torch.nn.Linear(4, 4), data=(str(huge), None), note=lines.append)
    assert est is not None and est.parts["data"] == 2 * MAX_CORPUS_BYTES
    assert "data 0.1" in lines[0]


def test_ratio_line_shows_what_was_asked_and_what_was_achieved(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, printed, err = run_cli(["compile", tiny(tmp_path), "--ratio", "0.5", "-o", str(out)], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    (s,) = m["students"]
    macs_cut = 1 - s["macs"] / m["teacher"]["macs"]
    flat = " ".join(printed.split())
    assert (f"macs50: --ratio 0.5 asked to remove 50% of the MACs; achieved {macs_cut:.0%} less MACs "
            f"({s['macs_reduction']:.2f}×) and") in flat  # fmt: skip
    assert "measured latency" in flat and "latency table" not in flat
    assert "-50% MACs" in printed  # the table's asked column
    assert "macs50: --ratio 0.5 asked to remove 50% of the MACs" in (out / "report.md").read_text()
