"""Fault injection for the command: bad flags and recipes, failing user code, kills, Ctrl-C,
concurrent compiles, a corrupt cache, plugins, budgets and torchrun. Each row of
docs/fault-injection.md is one of these tests.

Most use a tiny MLP teacher (a compile takes seconds); the torchrun test uses the digits example.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from potstill.cli import main
from potstill.pipeline import Pass
from potstill.state import CompileState

REPO = Path(__file__).resolve().parents[2]
DIGITS = f"{REPO / 'examples' / 'digits_cnn.py'}:teacher"

TINY = '''
import torch
from torch import nn

def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)){dtype}

def example_inputs():
    return (torch.randn(2, 8){dtype},)

def calib_data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 8, generator=g){dtype} for _ in range(4)]
{extra}
'''

#: runs the CLI in a child that kills itself (SIGKILL) or interrupts itself (SIGINT) at a stage:
#: a pass name, or a step of the output folder's swap
KILLER = '''
import os, signal, sys
import potstill.outputs.outdir as od
import potstill.pipeline as pl

stage, sig = sys.argv[1], getattr(signal, sys.argv[2])
call = pl.Pass.__call__
# Ctrl-C as a terminal delivers it: a parent that ignores SIGINT (SIG_IGN) passes that on through
# exec, and Python then installs no KeyboardInterrupt (a full xdist run once ignored it here: exit 0)
signal.signal(signal.SIGINT, signal.default_int_handler)

def hooked(self, state):
    if self.name == stage:
        if sig == signal.SIGSTOP:  # hold the lock: stand still until the test kills us
            import time
            print("holding", flush=True)
            time.sleep(120)
        os.kill(os.getpid(), sig)
    return call(self, state)

pl.Pass.__call__ = hooked
od._checkpoint = lambda step: os.kill(os.getpid(), sig) if step == stage else None
from potstill.cli import main
sys.exit(main(sys.argv[3:]))
'''


def tiny(tmp_path: Path, extra: str = "", dtype: str = "") -> str:
    path = tmp_path / "tiny.py"
    path.write_text(TINY.format(extra=textwrap.dedent(extra), dtype=dtype))
    return f"{path}:teacher"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ---------------------------------------------------------------------------------------------
# Options that used to be accepted and ignored


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--pipeline", "prune.width{ratio=0.5}", "--drop-layers", "1"], "--drop-layers with --pipeline"),
        (["--pipeline", "prune.width{ratio=0.5}", "--keep-layers", "2"], "--keep-layers with --pipeline"),
        (["--pipeline", "prune.width{ratio=0.5}", "--importance", "taylor"], "--importance with --pipeline"),
        (["--pipeline", "prune.width{ratio=0.5}", "--distill-epochs", "2"], "--distill-epochs with --pipeline"),
        (["--pipeline", "prune.width{ratio=0.5}", "--ratio", "0.3"], "ratio into the pipeline"),
        (["--distill-epochs", "-3"], "use --no-distill"),
        (["--pipeline", ",,,"], "empty item"),
        (["--pipeline", "prune.width{ratio=0.5,ratio=0.3}"], "given twice"),
        (["--pipeline", "prune.widht{ratio=0.5}"], "did you mean 'prune.width'"),
    ],
)
def test_moot_or_malformed_flags_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], fragment: str
) -> None:
    code, _, err = run_cli(["compile", DIGITS, *flags, "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_out_of_range_seed_is_refused_by_the_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["compile", DIGITS, "--seed", "100000000000000000000000", "-o", str(tmp_path / "o")])
    assert e.value.code == 2 and "out of range" in capsys.readouterr().err


def test_unknown_recipe_key_names_the_closest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nteacher: {DIGITS}\npipelne: importance.magnitude\n")
    code, _, err = run_cli(["compile", "--recipe", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "unknown key 'pipelne' (did you mean 'pipeline'?)" in err


def test_recipe_train_without_a_distilling_pass_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nteacher: {DIGITS}\npipeline: importance.magnitude,prune.width{{ratio=0.5}}\n"
                      "train: {lr: 0.01}\n")  # fmt: skip
    code, _, err = run_cli(["compile", "--recipe", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "train: no distillation pass" in err


# ---------------------------------------------------------------------------------------------
# User code that fails, checked before heavy work


@pytest.mark.parametrize(
    ("metric", "fragment"),
    [
        ("def metric(model):\n    raise RuntimeError('labels missing')\n", "metric() raised on the teacher: RuntimeError: labels missing"),
        ("def metric(model):\n    return 'great'\n", "metric() returned str 'great' on the teacher"),
    ],
)
def test_metric_that_fails_exits_2_before_heavy_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], metric: str, fragment: str
) -> None:
    code, _, err = run_cli(["compile", tiny(tmp_path, metric), "--no-distill", "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err
    assert "student macs50" not in err  # no student was started


def test_input_of_the_wrong_rank_is_blamed_on_the_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "conv.py"
    path.write_text("from torch import nn\n\ndef teacher():\n    return nn.Conv2d(3, 4, 3)\n")
    code, _, err = run_cli(["compile", f"{path}:teacher", "--input-shape", "1x3", "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "does not run on its example inputs [(1, 3)]" in err and "--input-shape" in err
    assert "control flow" not in err


@pytest.mark.parametrize("flag", ["teacher", "--calib"])
def test_an_input_inside_out_is_refused_and_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str) -> None:
    from potstill.outputs.outdir import new_run_id, write_mark

    out = tmp_path / "out"
    out.mkdir()
    write_mark(out, new_run_id(), "complete")  # an earlier OUT that potstill wrote and would replace
    teacher = (out if flag == "teacher" else tmp_path) / "conv.py"
    teacher.write_text("import torch\nfrom torch import nn\n\ndef teacher():\n    return nn.Conv2d(3, 4, 3)\n\n"
                       "def example_inputs():\n    return (torch.randn(1, 3, 8, 8),)\n\n"
                       "def calib():\n    return [torch.randn(2, 3, 8, 8)]\n")
    calib = out / "calib.py"
    calib.write_text(teacher.read_text())
    args = ["compile", f"{teacher}:teacher", "-o", str(out)]
    if flag == "--calib":
        args += ["--calib", f"{calib}:calib"]
    code, _, err = run_cli(args, capsys)
    flat = " ".join(err.split())
    assert code == 2, err
    assert f"{flag} " in flat and "lies inside -o" in flat, err
    assert teacher.is_file() and calib.is_file()  # nothing of the user's was deleted


def test_huge_input_shape_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "conv.py"
    path.write_text("from torch import nn\n\ndef teacher():\n    return nn.Conv2d(3, 4, 3)\n")
    code, _, err = run_cli(["compile", f"{path}:teacher", "--input-shape", "64x3x20000x20000", "-o",
                            str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 2
    flat = " ".join(err.split())  # the console may wrap the line
    # refused from the flag itself, before the teacher is built or any input allocated
    assert "--input-shape 64x3x20000x20000: 76,800,000,000 elements" in flat, err
    assert "give a realistic shape such as 1x3x224x224" in flat, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Whole compiles of the tiny teacher


@pytest.fixture(scope="module")
def good_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("good")
    teacher = tiny(base)
    out = base / "out"
    assert main(["compile", teacher, "--no-distill", "--ratio", "0.5", "-o", str(out)]) == 0
    return out, teacher


def test_float64_teacher_is_converted_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["compile", tiny(tmp_path, dtype=".double()"), "--no-distill", "-o", str(tmp_path / "out")], capsys)
    assert code == 0 and "torch.float64" in err and "converted" in err
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["students"][0]["parity"]["ok"]


def test_corrupt_cached_engine_is_rebuilt(good_out: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    src, teacher = good_out
    out = tmp_path / "out"
    shutil.copytree(src, out)
    onnx = out / "students" / "macs50" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:100])  # truncated
    code, _, err = run_cli(["compile", teacher, "--no-distill", "--ratio", "0.5", "-o", str(out)], capsys)
    assert code == 0 and "cached files changed" in err and "student macs50: unchanged" not in err
    m = json.loads((out / "manifest.json").read_text())
    assert onnx.stat().st_size > 1000 and m["students"][0]["sha256"]["model.onnx"]
    code, _, err = run_cli(["compile", teacher, "--no-distill", "--ratio", "0.5", "-o", str(out)], capsys)
    assert code == 0 and "unchanged since the last run" in err  # intact: reused


def test_local_module_change_invalidates_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "helper.py").write_text("WIDTH = 32\n")
    teacher = tiny(tmp_path, "import helper  # noqa\n")
    out = tmp_path / "out"
    assert run_cli(["compile", teacher, "--no-distill", "-o", str(out)], capsys)[0] == 0
    (tmp_path / "helper.py").write_text("WIDTH = 33\n")
    code, _, err = run_cli(["compile", teacher, "--no-distill", "-o", str(out)], capsys)
    assert code == 0 and "unchanged since the last run" not in err
    m = json.loads((out / "manifest.json").read_text())
    assert any(k.endswith("helper.py") for k in m["inputs"]["sources"])


def test_latency_budget_miss_is_marked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "tight.yaml"
    text = (REPO / "profiles" / "cpu.yaml").read_text()
    profile.write_text(text.replace("latency_budget_ms: null", "latency_budget_ms: 0.000001")
                       .replace("memory_budget_mb: null", "memory_budget_mb: 0.0001").replace("name: cpu", "name: tight"))
    code, _, err = run_cli(["compile", tiny(tmp_path), "--no-distill", "--profile", str(profile), "-o",
                            str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 0 and "warning: student macs50: OVER BUDGET: latency" in err and "OVER BUDGET: memory" in err
    (s,) = json.loads((tmp_path / "out" / "manifest.json").read_text())["students"]
    assert s["budgets"]["latency_ms"]["ok"] is False and s["budgets"]["memory_mb"]["ok"] is False
    assert "OVER BUDGET" in (tmp_path / "out" / "report.md").read_text()


PLUGIN = '''
from dataclasses import dataclass
from potstill.pipeline import function_pass


@dataclass(frozen=True)
class NudgeOptions:
    #: how much to add to the last layer's bias
    amount: float = 0.0


@function_pass("my.nudge", options=NudgeOptions, requires={"pruned"})
def nudge(state, opts):
    """Add a constant to the working student's last bias (a test pass)."""
    import torch
    with torch.no_grad():
        list(state.working().module.parameters())[-1].add_(opts.amount)
    return opts.amount != 0
'''


def test_plugin_pass_from_the_cli(registry: dict[str, type[Pass]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "my_passes.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "out"
    code, _, err = run_cli(["compile", tiny(tmp_path), "--plugin", str(plugin), "--pipeline",
                            "importance.magnitude,prune.width{ratio=0.5},my.nudge{amount=0.1}", "-o", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    (s,) = m["students"]
    assert s["pipeline"] == ["importance.magnitude", "prune.width{ratio=0.5}", "my.nudge{amount=0.1}",
                             "lower.onnxruntime", "record"]  # fmt: skip
    assert str(plugin.resolve()) in m["inputs"]["sources"]
    code, printed, _ = run_cli(["passes", "my.nudge", "--plugin", str(plugin)], capsys)
    assert code == 0 and "amount: float = 0.0  how much to add" in printed and "requires: pruned" in printed


def test_plugin_cannot_replace_a_builtin(registry: dict[str, type[Pass]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = tmp_path / "evil.py"
    plugin.write_text(PLUGIN.replace("my.nudge", "prune.width"))
    code, _, err = run_cli(["compile", tiny(tmp_path), "--plugin", str(plugin), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "'prune.width' is a built-in pass" in err


def test_family_students_come_from_an_unchanged_teacher() -> None:
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    teacher[0].weight.requires_grad_(False)  # the user froze a part on purpose
    state = CompileState.from_teacher(teacher, (torch.randn(2, 4),))
    state.teacher.requires_grad_(False)  # what a trainer does to the teacher it reads
    student = state.new_student("macs50")
    assert [p.requires_grad for p in student.module.parameters()] == [False, True, True, True]
    state.restore_teacher()
    assert [p.requires_grad for p in teacher.parameters()] == [False, True, True, True]


# ---------------------------------------------------------------------------------------------
# Kills, Ctrl-C and a second compile


def _killed(stage: str, sig: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    script = cwd / "killer.py"
    script.write_text(KILLER)
    return subprocess.run([sys.executable, str(script), stage, sig, *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, check=False)  # fmt: skip


@pytest.mark.parametrize("stage", ["prune.width", "lower.onnxruntime", "record", "record.teacher", "marked", "aside", "swapped"])
def test_kill_at_every_stage_keeps_or_recovers_out(
    good_out: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], stage: str
) -> None:
    import shutil

    src, teacher = good_out
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = (out / "manifest.json").read_text()
    # --no-cache: the teacher's record of the earlier run would be reused, and record.teacher never reached
    proc = _killed(stage, "SIGKILL", ["compile", teacher, "--no-distill", "--no-cache", "--ratio", "0.4", "-o", str(out)],
                   tmp_path)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if stage not in ("aside", "swapped"):
        assert (out / "manifest.json").read_text() == before  # the old OUT is untouched
    code, _, err = run_cli(["compile", teacher, "--no-distill", "--ratio", "0.4", "-o", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["students"][0]["name"] == "macs40"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.name.endswith((".tmp", ".old"))] == []


def test_ctrl_c_prints_one_line_and_exits_130(good_out: tuple[Path, str], tmp_path: Path) -> None:
    import shutil

    src, teacher = good_out
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = (out / "manifest.json").read_text()
    proc = _killed("lower.onnxruntime", "SIGINT", ["compile", teacher, "--no-distill", "--ratio", "0.4", "-o", str(out)], tmp_path)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("interrupted")
    assert (out / "manifest.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_compile_into_one_out_is_refused(good_out: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, teacher = good_out
    out = tmp_path / "out"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    first = subprocess.Popen([sys.executable, str(script), "record", "SIGSTOP", "compile", teacher, "--no-distill",
                              "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # fmt: skip
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "holding"
        code, _, err = run_cli(["compile", teacher, "--no-distill", "-o", str(out)], capsys)
        assert code == 2 and f"another potstill compile (pid {first.pid})" in err
    finally:
        first.kill()
        first.wait()
    assert run_cli(["compile", teacher, "--no-distill", "-o", str(out)], capsys)[0] == 0  # the lock died with it


# ---------------------------------------------------------------------------------------------
# torchrun


@pytest.mark.slow
def test_torchrun_two_ranks_train_and_rank_0_writes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipeline = "importance.magnitude,prune.width{ratio=0.5},distill{max_steps=8}"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "potstill",
         "compile", DIGITS, "--pipeline", pipeline, "-o", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (s,) = json.loads((out / "manifest.json").read_text())["students"]
    assert s["pipeline"][2] == "distill{max_steps=8}" and s["metrics"]["distill"]["steps"] == 8
    assert proc.stdout.count("wrote ") == 1 and proc.stderr.count("loading teacher") == 1  # rank 0 speaks and writes
    assert not (tmp_path / ".out.work" / "rank1").exists()  # rank 1's scratch is gone


# ---------------------------------------------------------------------------------------------
# Resume


KILL_AFTER_CHECKPOINT = '''
import os, signal, sys
import potstill.passes.distill.trainer as tr

save = tr.DistillTrainer.save

def save_then_die(self, step, *args, **kwargs):
    out = save(self, step, *args, **kwargs)
    if step >= 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

tr.DistillTrainer.save = save_then_die
from potstill.cli import main
sys.exit(main(sys.argv[1:]))
'''

TRAIN = '''
def train_data():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 8, generator=g) for _ in range(4)]
'''


def test_killed_distillation_resumes_from_its_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = tiny(tmp_path, TRAIN)
    out = tmp_path / "out"
    args = ["compile", teacher, "--pipeline", "importance.magnitude,prune.width{ratio=0.5},"
            "distill{epochs=3,max_steps=8,checkpoint_every=2,progress=false}", "-o", str(out)]  # fmt: skip
    script = tmp_path / "die.py"
    script.write_text(KILL_AFTER_CHECKPOINT)
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists() and list((tmp_path / ".out.work" / "checkpoints" / "student").iterdir())
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "resuming distillation from the checkpoints of a killed run" in err
    (s,) = json.loads((out / "manifest.json").read_text())["students"]
    assert s["metrics"]["distill"]["resumed_from"] == 4 and s["metrics"]["distill"]["steps"] == 8
    assert not (tmp_path / ".out.work" / "checkpoints" / "student").exists()  # finished: in OUT now


# ---------------------------------------------------------------------------------------------
# The product surface


def test_json_output_and_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["compile", tiny(tmp_path), "--no-distill", "--json", "-o", str(tmp_path / "out")], capsys)
    assert code == 0
    m = json.loads(out)  # stdout is only the manifest
    assert m["students"][0]["name"] == "macs50" and m["host"]["cpu"]
    assert m["students"][0]["latency_ms"]["source"] == "engine"
    code, out, err = run_cli(["compile", tiny(tmp_path), "--no-distill", "--quiet", "-o", str(tmp_path / "out")], capsys)
    # quiet: the table, and only the loud lines (here: not distilled) on stderr
    assert code == 0 and "macs50" in out and "wrote" not in out
    assert all(line.startswith("warning:") for line in err.splitlines() if line.strip()), err
    code, out, _ = run_cli(["compile", DIGITS, "--pipeline", ",,", "--json", "-o", str(tmp_path / "o2")], capsys)
    assert code == 2 and "empty item" in json.loads(out)["error"]


def test_python_dash_m_potstill_and_pass_options() -> None:
    proc = subprocess.run([sys.executable, "-m", "potstill", "passes", "prune.width", "--json"], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["name"] == "prune.width" and "pruned" in info["ensures"]
    ratio = next(o for o in info["options"] if o["name"] == "ratio")
    assert "float" in ratio["type"]


def test_a_family_with_distillation_trains_every_student(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(["compile", tiny(tmp_path, TRAIN), "--ratio", "0.3", "--ratio", "0.5", "--distill-epochs", "1",
                            "-o", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    students = json.loads((out / "manifest.json").read_text())["students"]
    assert [s["name"] for s in students] == ["macs30", "macs50"]
    assert all(s["metrics"]["distill"]["steps"] == 4 for s in students)  # the second student trained too


ESTIMATOR_PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

from potstill.passes.importance.base import estimator
from potstill.passes.importance.magnitude import MagnitudeImportance


@estimator
@dataclass(frozen=True)
class SmallestFirst(MagnitudeImportance):
    """``importance.smallest``: the reverse of magnitude (keeps the smallest units; a test estimator)."""

    name: ClassVar[str] = "smallest"

    def scores(self, target, analysis, batches=None):
        return {g: -s for g, s in super().scores(target, analysis, batches).items()}
'''


def test_plugin_estimator_is_named_in_prune_width(registry: dict[str, type[Pass]], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from potstill.passes.importance import ESTIMATORS
    from safetensors.torch import load_file

    before = dict(ESTIMATORS)
    plugin = tmp_path / "my_estimator.py"
    plugin.write_text(ESTIMATOR_PLUGIN)
    try:
        outs = {}
        for name in ("magnitude", "smallest"):
            out = tmp_path / f"out-{name}"
            code, _, err = run_cli(["compile", tiny(tmp_path), "--plugin", str(plugin), "--pipeline",
                                    f"prune.width{{ratio=0.5,importance={name}}}", "--no-teacher-timing",
                                    "-o", str(out)], capsys)  # fmt: skip
            assert code == 0, err
            student = json.loads((out / "manifest.json").read_text())["students"][0]
            outs[name] = (student, load_file(str(out / student["dir"] / "model.safetensors")))
        assert outs["smallest"][0]["pipeline"][0] == "prune.width{ratio=0.5,importance=smallest}"
        # the plugin's scores kept other units than magnitude's: same shapes, other weights
        (a, wa), (_, wb) = outs["magnitude"], outs["smallest"]
        assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}
        assert any(not torch.equal(wa[k], wb[k]) for k in wa), a["pipeline"]
        code, _, err = run_cli(["compile", tiny(tmp_path), "--pipeline", "prune.width{ratio=0.5,importance=nope}",
                                "-o", str(tmp_path / "bad")], capsys)  # fmt: skip
        assert code == 2 and "unknown importance 'nope'" in err and "smallest" in err
    finally:
        ESTIMATORS.clear()
        ESTIMATORS.update(before)


TARGET_PLUGIN = '''
from dataclasses import replace
from pathlib import Path

from potstill.targets.onnx_targets import lower_onnx
from potstill.targets.registry import target


@target("wrapped_onnx")
def lower_wrapped(module, args, profile, out_dir, *, kwargs, dynamic_batch):
    """The ONNX target plus a marker file (a test backend)."""
    art = lower_onnx(module, args, profile, out_dir, kwargs=kwargs, dynamic_batch=dynamic_batch)
    marker = Path(out_dir) / "wrapped.txt"
    marker.write_text("lowered by the plugin target")
    return replace(art, target="wrapped_onnx", files={**art.files, "marker": marker})
'''


def test_plugin_pass_estimator_and_target_from_the_cli(registry: dict[str, type[Pass]], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """One plugin file adds a pass, an importance estimator and a target; one compile uses all three."""
    from potstill.passes.importance import ESTIMATORS
    from potstill.targets.registry import TARGETS

    estimators, targets = dict(ESTIMATORS), dict(TARGETS)
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text("\n".join([PLUGIN, ESTIMATOR_PLUGIN, TARGET_PLUGIN]))
    out = tmp_path / "out"
    try:
        code, _, err = run_cli(["compile", tiny(tmp_path), "--plugin", str(plugin), "--target", "wrapped_onnx",
                                "--pipeline", "prune.width{ratio=0.5,importance=smallest},my.nudge{amount=0.1}",
                                "-o", str(out)], capsys)  # fmt: skip
        assert code == 0, err
        m = json.loads((out / "manifest.json").read_text())
        (s,) = m["students"]
        assert s["pipeline"] == ["prune.width{ratio=0.5,importance=smallest}", "my.nudge{amount=0.1}",
                                 "lower.wrapped_onnx", "record"]  # fmt: skip
        folder = out / s["dir"]
        assert (folder / "wrapped.txt").read_text() == "lowered by the plugin target"
        assert (folder / "model.onnx").is_file()
        assert s["parity"]["ok"] is True
        code, printed, _ = run_cli(["passes", "--plugin", str(plugin)], capsys)
        assert code == 0 and {"lower.wrapped_onnx", "lower.onnx", "my.nudge", "importance.smallest"} <= set(printed.split())
        # a target nobody registered is refused with the list, the plugin's included
        code, _, err = run_cli(["compile", tiny(tmp_path), "--plugin", str(plugin), "--target", "wraped_onnx",
                                "-o", str(tmp_path / "bad")], capsys)  # fmt: skip
        assert code == 2 and "wraped_onnx" in err and "did you mean 'wrapped_onnx'" in err, err
    finally:
        ESTIMATORS.clear()
        ESTIMATORS.update(estimators)
        TARGETS.clear()
        TARGETS.update(targets)


def test_a_plugin_cannot_take_a_builtin_target_name() -> None:
    from potstill.errors import InputError
    from potstill.targets.registry import target

    def lower_fake(module: object, args: object, profile: object, out_dir: object, *, kwargs: object,
                   dynamic_batch: bool) -> None:  # fmt: skip
        """Not a backend."""

    with pytest.raises(InputError, match="'onnx' is a built-in target"):
        target("onnx")(lower_fake)
