"""The ``potstill`` command: planning, recipes, exit codes, inspect, and one real end-to-end compile."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import potstill.pipeline as pl
import pytest
import torch
from potstill.cli import main
from potstill.errors import InputError
from potstill.pipeline import Pass, function_pass
from potstill.plan import CompileOptions, apply_recipe, plan_students
from potstill.state import CompileState

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = f"{REPO / 'examples' / 'digits_cnn.py'}:teacher"




# ---------------------------------------------------------------------------------------------
# Planning


def specs(plans: list[Any]) -> dict[str, str]:
    """Each plan's spec, once the plan is checked against the real passes' contracts: every pass is the
    built-in class its module registers, and every fact a pass requires is ensured by a pass before
    it (a compile starts with no facts)."""
    for plan in plans:
        facts: set[str] = set()
        for p in plan.passes:
            assert type(p).__module__ == pl.BUILTIN_PASSES.get(p.name, type(p).__module__), p.name
            needed = {f.name for f in pl.predicates(type(p).requires) if isinstance(f, pl.Fact)}
            assert needed <= facts, f"{plan.name}: '{p.name}' requires {needed - facts}, which no earlier pass ensures"
            facts |= {f.name for f in pl.predicates(type(p).ensures) if isinstance(f, pl.Fact)}
    return {p.name: p.spec for p in plans}


def test_default_plan_is_one_student_at_half_width() -> None:
    assert specs(plan_students(CompileOptions(), "onnxruntime")) == {
        "macs50": "prune.width{ratio=0.5},bn.recalibrate,lower.onnxruntime,record"
    }


def test_one_student_per_ratio_with_the_chosen_importance_and_target() -> None:
    plans = plan_students(CompileOptions(ratios=(0.3, 0.7), importance="taylor"), "aoti")
    assert specs(plans) == {
        "macs30": "importance.taylor,prune.width{ratio=0.3},bn.recalibrate,lower.aoti,record",
        "macs70": "importance.taylor,prune.width{ratio=0.7},bn.recalibrate,lower.aoti,record",
    }


def test_depth_options_add_depth_pruning() -> None:
    plans = plan_students(CompileOptions(ratios=(0.5,), drop_layers=2), "onnxruntime")
    # the real prune.depth scores the blocks itself (it requires no block_importance), so no importance.blocks
    assert specs(plans) == {
        "macs50-d2": "prune.depth{drop=2},prune.width{ratio=0.5},bn.recalibrate,lower.onnxruntime,record"
    }
    plans = plan_students(CompileOptions(keep_layers=3), "onnxruntime")
    assert specs(plans) == {"k3": "prune.depth{keep=3},bn.recalibrate,lower.onnxruntime,record"}


def test_user_pipeline_and_ratio_placeholder() -> None:
    plans = plan_students(CompileOptions(pipeline="importance.magnitude,prune.width{ratio=0.25}"), "onnxruntime")
    assert specs(plans) == {"student": "importance.magnitude,prune.width{ratio=0.25},lower.onnxruntime,record"}
    plans = plan_students(CompileOptions(pipeline="prune.width{ratio=$ratio},lower.aoti", ratios=(0.2, 0.4)), "onnxruntime")
    assert specs(plans) == {"macs20": "prune.width{ratio=0.2},lower.aoti,record", "macs40": "prune.width{ratio=0.4},lower.aoti,record"}


@pytest.mark.parametrize(
    ("opts", "target", "fragment"),
    [
        (CompileOptions(ratios=(1.5,)), "onnxruntime", "between 0.01 and 0.95"),
        (CompileOptions(ratios=(1e-9,)), "onnxruntime", "fraction of the MACs (or latency) to remove"),
        (CompileOptions(ratios=(0.5, 0.5)), "onnxruntime", "share a name"),
        (CompileOptions(), "tflite", "--target 'tflite'"),
        (CompileOptions(pipeline="prune.width{ratio=0.5}", ratios=(0.3,)), "onnxruntime", "ratio into the pipeline"),
        (CompileOptions(pipeline="prune.width{ratio=$ratio}"), "onnxruntime", "give --ratio"),
        (CompileOptions(drop_layers=1, keep_layers=2), "onnxruntime", "not both"),
        (CompileOptions(drop_layers=0), "onnxruntime", "at least 1"),
        (CompileOptions(pipeline="prune.width{ratio=0.5}", drop_layers=1), "onnxruntime", "--drop-layers with --pipeline"),
        (CompileOptions(pipeline="prune.width{ratio=0.5}", keep_layers=1), "onnxruntime", "--keep-layers with --pipeline"),
        (CompileOptions(pipeline="prune.width{ratio=0.5}", importance="taylor"), "onnxruntime", "--importance with --pipeline"),
        (CompileOptions(pipeline="prune.width{ratio=0.5}", distill_epochs=2), "onnxruntime", "--distill-epochs with --pipeline"),
        (CompileOptions(distill_epochs=0), "onnxruntime", "use --no-distill"),
        (CompileOptions(distill_epochs=-3), "onnxruntime", "use --no-distill"),
        (CompileOptions(pipeline=",,,"), "onnxruntime", "empty item"),
        (CompileOptions(pipeline="prune.width{ratio=0.5,ratio=0.3}"), "onnxruntime", "given twice"),
        (CompileOptions(pipeline="prune.width{ratio=0.5},record"), "onnxruntime", "added to every plan"),
        (CompileOptions(seed=2**40), "onnxruntime", "--seed"),
    ],
)
def test_planning_errors(opts: CompileOptions, target: str, fragment: str) -> None:
    with pytest.raises(InputError, match=re.escape(fragment)):
        plan_students(opts, target)


def test_recipe_fills_unset_options_relative_to_its_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    recipe = tmp_path / "sub" / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""
        version: 1
        teacher: model.py:factory
        profile: cpu
        ratio: 0.4
        calib: data.py:calib
        pipeline:
          - importance.magnitude
          - prune.width: {ratio: 0.4}
    """))
    opts = apply_recipe(CompileOptions(recipe=str(recipe), profile="arm", out="o"))
    assert opts.teacher == f"{tmp_path / 'sub' / 'model.py'}:factory"
    assert opts.calib == f"{tmp_path / 'sub' / 'data.py'}:calib"
    assert opts.profile == "arm"  # the command line wins
    assert opts.ratios == (0.4,)
    assert opts.pipeline == ["importance.magnitude", {"prune.width": {"ratio": 0.4}}]
    assert opts.extra["path"] == str(recipe.resolve())


def test_distillation_recipe_data_mapping(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""
        version: 1
        teacher: models.py:make_teacher
        data: {train: data.py:train, eval: data.py:test, calib: data.py:calib}
        pipeline: "prune.width{ratio=0.5},distill{method=kd,epochs=3}"
        stages:
          - {name: general, method: hidden, epochs: 1}
    """))
    opts = apply_recipe(CompileOptions(recipe=str(recipe)))
    assert opts.data == f"{tmp_path / 'data.py'}:train"
    assert opts.eval_data == f"{tmp_path / 'data.py'}:test"
    assert opts.calib == f"{tmp_path / 'data.py'}:calib"
    assert opts.pipeline == "prune.width{ratio=0.5},distill{method=kd,epochs=3}"
    assert [s.model_dump(exclude_defaults=True) for s in opts.recipe_data.stages] == [
        {"name": "general", "method": "hidden", "epochs": 1}]


def test_recipe_pipeline_mapping_builds_passes() -> None:
    opts = CompileOptions(pipeline=["importance.magnitude", {"prune.width": {"ratio": 0.4}}])
    assert specs(plan_students(opts, "onnxruntime")) == {"student": "importance.magnitude,prune.width{ratio=0.4},lower.onnxruntime,record"}


def test_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        apply_recipe(CompileOptions(recipe=str(tmp_path / "none.yaml")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(InputError, match="expected a mapping"):
        apply_recipe(CompileOptions(recipe=str(bad)))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("teacher: m.py:f\n", "add 'version: 1'"),
        ("version: 2\n", "version: 2 is not supported"),
        ("version: 1\npipelne: importance.magnitude\n", "unknown key 'pipelne' (did you mean 'pipeline'?)"),
        ("version: 1\ndata: {trian: d.py:f}\n", "data.trian: unknown key 'trian' (did you mean 'train'?); valid keys: calib, eval, train"),
        ("version: 1\nseed: lots\n", "seed"),
        ("version: 1\nratio: [0.3, x]\n", "ratio"),
        ("version: 1\nstages: [{name: a, epoks: 1}]\n", "stages.0.epoks: unknown key 'epoks' (did you mean 'epochs'?)"),
        ("version: 1\nstages: [{name: a, method: kdd}]\n", "stages.0: Value error, distill: unknown method 'kdd'"),
    ],
)
def test_recipe_schema_is_strict(tmp_path: Path, text: str, fragment: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(InputError, match=re.escape(fragment)):
        apply_recipe(CompileOptions(recipe=str(recipe)))


def _recipe_opts(tmp_path: Path, text: str, **kw: Any) -> CompileOptions:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\n" + text)
    return apply_recipe(CompileOptions(recipe=str(recipe), **kw))


def test_recipe_train_feeds_the_distill_pass_or_is_an_error(tmp_path: Path) -> None:
    opts = _recipe_opts(tmp_path, "train: {lr: 0.01}\n")
    assert specs(plan_students(opts, "onnxruntime", distill_epochs=2))["macs50"].startswith(
        "prune.width{ratio=0.5},bn.recalibrate,fidelity{stage=before_distill},distill{epochs=2,lr=0.01}")
    with pytest.raises(InputError, match="train: no distillation pass"):
        plan_students(opts, "onnxruntime")  # no training data: nothing would read train:
    with pytest.raises(InputError, match="unknown option"):
        plan_students(_recipe_opts(tmp_path, "train: {lrr: 0.01}\n"), "onnxruntime", distill_epochs=2)
    with pytest.raises(InputError, match=r"train\.lr is also set"):
        plan_students(_recipe_opts(tmp_path, "train: {lr: 0.01}\npipeline: distill{lr=0.1}\n"), "onnxruntime")


def test_recipe_stages_drive_progressive_distillation(tmp_path: Path) -> None:
    opts = _recipe_opts(tmp_path, "stages: [{name: general, method: kd, epochs: 1}, {name: task, epochs: 2}]\n")
    (plan,) = plan_students(opts, "onnxruntime")
    assert [p.name for p in plan.passes][1:] == ["bn.recalibrate", "fidelity", "distill.progressive", "lower.onnxruntime", "record"]
    assert [s.name for s in plan.passes[3].options.stages] == ["general", "task"]
    with pytest.raises(InputError, match=r"no distill\.progressive pass"):
        plan_students(_recipe_opts(tmp_path, "stages: [{name: a}]\npipeline: prune.width{ratio=0.5}\n"), "onnxruntime")


# ---------------------------------------------------------------------------------------------
# Exit codes and the small commands


def test_user_errors_exit_2_in_red_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compile", f"{tmp_path / 'missing.py'}:factory", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "error:" in err and "missing.py" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_pass_exits_2_naming_the_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compile", EXAMPLE, "--pipeline", "prune.sideways", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown pass 'prune.sideways'" in err and "prune.width" in err


def test_output_folder_that_is_not_ours_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert main(["compile", EXAMPLE, "-o", str(mine)]) == 2
    assert "no .potstill mark" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "precious"
    assert main(["compile", EXAMPLE, "-o", "."]) == 2
    assert "working folder" in capsys.readouterr().err


def test_missing_output_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", EXAMPLE]) == 2
    assert "-o OUT" in capsys.readouterr().err


def test_bugs_propagate_with_their_traceback(registry: dict[str, type[Pass]], monkeypatch: pytest.MonkeyPatch) -> None:
    import potstill.driver

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(potstill.driver, "compile_teacher", broken)
    with pytest.raises(ZeroDivisionError):
        main(["compile", EXAMPLE, "-o", "unused"])


def test_inspect_prints_ir_groups_blocks_and_cost(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "= conv2d(%x, @stem.0.weight)" in out  # the op listing
    assert "coupled channel groups" in out and "model output" in out  # the pinned classifier and why
    assert "stage1.0" in out and "residual" in out
    assert "MACs" in out and "peak activation" in out


def test_profiles_and_passes_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles"]) == 0
    assert "cpu" in capsys.readouterr().out
    assert main(["passes"]) == 0
    names = capsys.readouterr().out.split()
    assert "prune.width" in names and "lower.onnxruntime" in names


def test_profile_writes_a_profile_the_loader_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from potstill.profiles import load_profile

    path = tmp_path / "my-device.yaml"
    assert main(["profile", "--profile", "cpu", "-o", str(path), "--quick"]) == 0
    assert str(path) in capsys.readouterr().out
    profile = load_profile(str(path))
    assert profile.latency_table is not None and profile.target == "onnxruntime"


def test_failed_run_leaves_no_output(registry: dict[str, type[Pass]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    @function_pass("test.boom")
    def boom(state: CompileState, opts: object) -> bool:
        raise RuntimeError("disk on fire")

    out = tmp_path / "out"
    code = main(["compile", EXAMPLE, "--pipeline", "importance.magnitude,prune.width{ratio=0.5},test.boom", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "pass 'test.boom' failed" in err and "importance.magnitude, prune.width{ratio=0.5}" in err
    assert not out.exists()
    # no temporary sibling left behind either (the lock file and the work area stay by design)
    assert [p.name for p in tmp_path.iterdir() if p.name not in (".out.lock", ".out.work")] == []


# ---------------------------------------------------------------------------------------------
# End to end on the bundled example (real data, real engines)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("e2e") / "demo"
    cmd = [sys.executable, "-m", "potstill.cli", "compile", EXAMPLE, "--profile", "cpu", "--ratio", "0.5",
           "--debug", "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=out.parent)
    return proc, out


def test_e2e_compile_succeeds_and_prints_the_table(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, _ = demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "teacher" in proc.stdout and "macs50" in proc.stdout and "speed-up" in proc.stdout


def test_e2e_manifest(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    t = m["teacher"]
    assert t["macs"] > 0 and t["params"] > 0 and t["latency_ms"]["median"] > 0
    assert t["metric"] > 0.95
    (s,) = m["students"]
    assert s["name"] == "macs50" and s["dir"] == "students/macs50"
    assert 0 < s["macs"] < t["macs"] / 2  # ratio 0.5: at most half of the MACs
    assert 0 < s["params"] < t["params"]
    assert s["latency_ms"]["median"] > 0 and s["latency_ms"]["p90"] >= s["latency_ms"]["median"]
    assert s["parity"]["ok"] is True and s["parity"]["max_abs"] < 1e-3 and "rel" in s["parity"]
    widths_t, widths_s = t["architecture"]["widths"], s["architecture"]["widths"]
    assert set(widths_s) <= set(widths_t) and any(widths_s[k] < widths_t[k] for k in widths_s)
    # the example file has training data, so the default pipeline distils the pruned student
    assert s["pipeline"] == ["prune.width{ratio=0.5}", "bn.recalibrate",
                             "fidelity{stage=before_distill}", "distill{epochs=3,lr_probe=[0.001,0.00025,6.25e-05]}",
                             "lower.onnxruntime", "record"]
    assert s["metrics"]["fidelity_before_distill"]["score"] <= s["fidelity"]["score"]
    assert [h for h in s["history"] if h in s["pipeline"]] == s["pipeline"]  # written by the PassManager
    assert s["fidelity"]["task"] == "classification" and 0.9 < s["fidelity"]["score"] <= 1.0
    assert m["host"]["cpu"] and m["host"]["torch_threads"] >= 1
    assert set(m["timings"]["passes"]) == {"macs50", "teacher"}
    assert s["metric"] > 0.9  # accuracy on held-out digits after distillation (0.1 without it)
    assert s["history"] and s["speedup"] > 0 and s["macs_reduction"] >= 2
    inputs = m["inputs"]
    assert len(inputs["teacher"]["sha256"]["digits_cnn.py"]) == 64 and len(inputs["teacher"]["weights_sha256"]) == 64
    assert m["profile"]["name"] == "cpu" and m["versions"]["torch"].startswith("2.")


def test_e2e_files_run_on_other_batch_sizes(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    import onnxruntime as ort

    proc, out = demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    student = out / "students" / "macs50"
    x = torch.randn(3, 1, 16, 16)
    program = torch.export.load(str(student / "student.pt2"))
    y_pt2 = program.module()(x)
    sess = ort.InferenceSession(str(student / "model.onnx"), providers=["CPUExecutionProvider"])
    (y_onnx,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert y_pt2.shape == (3, 10) and y_onnx.shape == (3, 10)
    torch.testing.assert_close(torch.from_numpy(y_onnx), y_pt2.detach(), atol=1e-4, rtol=1e-4)


def test_e2e_report_plot_and_debug_dumps(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = (out / "report.md").read_text()
    assert "| macs50 |" in report and "pareto.png" in report
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dumps = sorted(p.name for p in (out / "debug" / "ir" / "macs50").iterdir())
    assert any("after-prune.width" in d for d in dumps)
    # no temporary sibling, work area or lock file left (the lock is removed when it is released)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".demo")] == []


def test_e2e_rerun_reuses_unchanged_students(
    demo: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    proc, out = demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = tmp_path / "again"
    shutil.copytree(out, again)
    before = json.loads((again / "manifest.json").read_text())
    assert main(["compile", EXAMPLE, "--profile", "cpu", "--ratio", "0.5", "-o", str(again)]) == 0
    assert "macs50: unchanged since the last run" in capsys.readouterr().err
    after = json.loads((again / "manifest.json").read_text())
    assert after["students"][0]["latency_ms"] == before["students"][0]["latency_ms"]  # reused, not re-measured
    assert (again / "students" / "macs50" / "model.onnx").is_file() and not (again / "debug").exists()


# ---------------------------------------------------------------------------------------------
# End to end on a (tiny, locally built) Hugging Face model


@pytest.fixture(scope="module")
def hf_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    transformers = pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("hf")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                  architectures=["BertForSequenceClassification"])  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(base / "tiny-bert")
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "small", "model", "runs", "fast"]
    (base / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(base / "vocab.txt")).save_pretrained(base / "tiny-bert")
    out = base / "out"
    cmd = [sys.executable, "-m", "potstill.cli", "compile", f"hf:{base / 'tiny-bert'}", "--ratio", "0.5", "-o", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=base)
    return proc, out


def test_hf_e2e_compiles_with_hf_folder_and_dynamic_program(hf_demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = hf_demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "docstrings" in proc.stderr  # the default calibration corpus is announced
    m = json.loads((out / "manifest.json").read_text())
    assert m["teacher"]["hf"]["task"] == "text-classification"
    (s,) = m["students"]
    assert s["parity"]["ok"] and s["macs"] < m["teacher"]["macs"]
    hf_dir = out / "students" / "macs50" / "hf"
    # potstill's own reload record always works; hf/ only where the config can state the widths
    assert s["loaders"][0] == "potstill.load_student"
    assert (out / "students" / "macs50" / "architecture.json").is_file()
    assert hf_dir.is_dir() == (len(s["loaders"]) > 1)
    if hf_dir.is_dir():
        assert (hf_dir / "config.json").is_file()
    assert {"config.json", "model.safetensors"} <= set(m["inputs"]["teacher"]["sha256"])
    program = torch.export.load(str(out / "students" / "macs50" / "student.pt2"))
    ids = torch.randint(5, 17, (3, 32))
    y = program.module()(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    assert y["logits"].shape == (3, 3)


def test_hf_e2e_student_reloads_with_from_pretrained(hf_demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """Depth pruning leaves every width the config states: hf/ is written, and AutoModel's
    from_pretrained gives the same student as load_student. Non-uniform widths are not
    describable by a config: then hf/ is absent, the note says why, and load_student still works."""
    import transformers
    from potstill.outputs.students_io import load_student

    proc, out = hf_demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    ids = torch.randint(5, 17, (2, 12))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    (nonuniform,) = json.loads((out / "manifest.json").read_text())["students"]
    if not (out / "students" / "macs50" / "hf").is_dir():
        assert any("hf/ not written" in n and "load_student" in n for n in nonuniform["notes"]), nonuniform["notes"]
    teacher_dir = out.parent / "tiny-bert"
    depth_out = out.parent / "depth"
    cmd = [sys.executable, "-m", "potstill.cli", "compile", f"hf:{teacher_dir}", "--pipeline",
           "prune.depth{drop=1},lower.onnxruntime", "--no-teacher-timing", "-o", str(depth_out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (s,) = json.loads((depth_out / "manifest.json").read_text())["students"]
    folder = depth_out / "students" / s["name"]
    assert (folder / "hf" / "config.json").is_file(), s["notes"]
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder / "hf")).eval()
    assert reloaded.config.num_hidden_layers == 1
    rebuilt = load_student(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**kwargs).logits, rebuilt(**kwargs).logits, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in reloaded.parameters()) == s["params"]
