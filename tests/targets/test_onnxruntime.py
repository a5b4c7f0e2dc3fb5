"""ONNX export + ONNX Runtime: parity on held-out inputs, dynamic batch, parity failures, the pass."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from potstill.errors import ParityError
from potstill.pipeline import PassManager, build_pipeline
from potstill.profiles import load_profile
from potstill.state import CompileState
from potstill.targets import Artifact, lower, measure_torch_latency
from potstill.targets.onnx_export import flat_spec
from potstill.targets.onnxruntime import OnnxExport, ort_parity_and_latency
from potstill.targets.parity import Inputs
from torch import nn


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["output"], feeds)[0]


def test_cnn_parity_and_dynamic_batch(cnn: nn.Module, tmp_path: Path) -> None:
    x = torch.randn(1, 3, 16, 16)
    art = lower(cnn, (x,), "cpu", tmp_path)
    assert isinstance(art, Artifact) and art.target == "onnxruntime" and art.precision == "fp32"
    path = art.files["onnx"]
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert not list(tmp_path.glob("*.data")), "weights must be inside the one ONNX file"
    assert art.parity["ok"] and art.parity["max_abs"] < 1e-4 and art.parity["n_inputs"] >= 4
    assert art.latency_ms["median"] > 0 and art.latency_ms["p90"] >= art.latency_ms["median"]
    assert any("dynamo" in n for n in art.notes)
    # engines run batches, not the one example
    x5 = torch.randn(5, 3, 16, 16)
    got = _ort(path, {"x": x5.numpy()})
    np.testing.assert_allclose(got, cnn(x5).detach().numpy(), atol=1e-4)
    assert art.to_dict()["files"]["onnx"] == str(path)


def test_fixed_batch_profile_exports_static_batch(cnn: nn.Module, tmp_path: Path) -> None:
    profile = load_profile("cpu").model_copy(update={"batch": 2})
    art = lower(cnn, (torch.randn(1, 3, 16, 16),), profile, tmp_path)
    dim0 = onnx.load(str(art.files["onnx"])).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 2
    assert any("batch fixed" in n for n in art.notes)


def test_transformer_like_with_keyword_inputs(encoder: nn.Module, token_inputs: dict, tmp_path: Path) -> None:
    art = lower(encoder, (), "cpu", tmp_path, example_kwargs=token_inputs)
    model = onnx.load(str(art.files["onnx"]))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert art.parity["ok"] and art.parity["rel"] < 1e-4
    feeds = {k: v.repeat(2, 1).numpy() for k, v in token_inputs.items()}  # batch 4
    ref = encoder(**{k: torch.from_numpy(v) for k, v in feeds.items()})["last_hidden_state"]
    np.testing.assert_allclose(_ort(art.files["onnx"], feeds), ref.detach().numpy(), atol=1e-4)


def test_hf_model_through_optimum(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("optimum.exporters.onnx")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    kwargs = {"input_ids": torch.randint(0, 64, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    art = lower(model, (), "cpu", tmp_path / "out", example_kwargs=kwargs,
                hf={"dir": str(tmp_path / "hf"), "task": "feature-extraction"})
    assert art.parity["ok"]
    assert any("Optimum" in n for n in art.notes)
    names = [i.name for i in onnx.load(str(art.files["onnx"])).graph.input]
    assert names[:2] == ["input_ids", "attention_mask"]
    # a directory Optimum cannot read falls back to the own exporter and says so
    art2 = lower(model, (), "cpu", tmp_path / "out2", example_kwargs=kwargs, hf={"dir": str(tmp_path / "none")})
    assert art2.parity["ok"] and any("Optimum export not used" in n for n in art2.notes)
    # hf naming another model (the teacher's dir for a changed student): detected, own export used
    other = transformers.BertModel(cfg).eval()
    art3 = lower(other, (), "cpu", tmp_path / "out3", example_kwargs=kwargs, hf={"dir": str(tmp_path / "hf")})
    assert art3.parity["ok"] and any("is not this module" in n for n in art3.notes)


def test_tampered_weights_raise_parity_error(cnn: nn.Module, tmp_path: Path) -> None:
    x = torch.randn(1, 3, 16, 16)
    art = lower(cnn, (x,), "cpu", tmp_path)
    path = art.files["onnx"]
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    tampered = numpy_helper.to_array(init) * 1.5
    init.CopyFrom(numpy_helper.from_array(tampered.astype(np.float32), init.name))
    onnx.save(model, str(path))
    profile = load_profile("cpu")
    exported = OnnxExport(path, flat_spec(cnn, (x,), {}), "tampered")
    with pytest.raises(ParityError) as err:
        ort_parity_and_latency(cnn, path, exported, ((x,), {}), profile, dynamic=True)
    message = str(err.value)
    assert str(path) in message and "max_abs=" in message and "rel=" in message
    assert f"tolerance {profile.tolerance.max_abs:g}" in message


def test_nan_student_fails_parity_naming_the_output(cnn: nn.Module, tmp_path: Path) -> None:
    """One NaN weight makes torch and the engine both NaN; max(0.0, nan) used to call that exact."""
    with torch.no_grad():
        cnn.head.weight[0, 0] = float("nan")
    with pytest.raises(ParityError, match=r"ONNX Runtime engine .*model\.onnx: output 'output' is not finite") as err:
        lower(cnn, (torch.randn(1, 3, 16, 16),), "cpu", tmp_path)
    assert "PyTorch student gave" in str(err.value) and "training data" in str(err.value)


def test_engine_that_outputs_inf_fails_parity(cnn: nn.Module, tmp_path: Path) -> None:
    x = torch.randn(1, 3, 16, 16)
    path = lower(cnn, (x,), "cpu", tmp_path).files["onnx"]
    model = onnx.load(str(path))
    (bias,) = [t for t in model.graph.initializer if tuple(t.dims) == (10,)]
    bias.CopyFrom(numpy_helper.from_array(np.full(10, np.inf, dtype=np.float32), bias.name))
    onnx.save(model, str(path))
    exported = OnnxExport(path, flat_spec(cnn, (x,), {}), "tampered")
    with pytest.raises(ParityError, match=r"output 'output' is not finite.*engine gave 10 NaN/inf") as err:
        ort_parity_and_latency(cnn, path, exported, ((x,), {}), load_profile("cpu"), dynamic=False)
    assert "PyTorch student" not in str(err.value)
    parity, _, _ = ort_parity_and_latency(cnn, path, exported, ((x,), {}), load_profile("cpu"), dynamic=False,
                                          check=False, budget_s=0.01)
    assert parity["ok"] is False and parity["nonfinite"] == {"engine": 10, "torch": 0, "input": 0}


def test_errors_never_hide_nan() -> None:
    from potstill.targets.parity import errors, within

    tol = load_profile("cpu").tolerance
    assert errors(np.array([np.nan]), np.array([np.nan])) != errors(np.array([np.nan]), np.array([np.nan]))  # nan
    assert not within(*errors(np.array([1.0, np.nan]), np.array([1.0, 2.0])), tol)
    assert not within(*errors(np.array([1.0]), np.array([np.inf])), tol)
    assert within(*errors(np.array([1.0, 2.0]), np.array([1.0, 2.0])), tol)


def test_lower_pass_lowers_every_student(cnn: nn.Module, tmp_path: Path) -> None:
    state = CompileState(teacher=cnn, example_inputs=(torch.randn(1, 3, 16, 16),), profile=load_profile("cpu"),
                         out_dir=tmp_path)
    PassManager(build_pipeline("lower.onnxruntime")).run(state)
    student = state.students[0]
    assert "lowered" in state.facts
    art = student.artifacts["onnxruntime"]
    assert art.files["onnx"] == tmp_path / "students" / student.name / "model.onnx"
    assert student.metrics["parity"]["ok"] and student.metrics["latency_ms"]["median"] > 0
    assert student.metrics["targets"]["onnxruntime"]["precision"] == "fp32"


def test_measure_torch_latency(cnn: nn.Module) -> None:
    lat = measure_torch_latency(cnn, (torch.randn(1, 3, 16, 16),), budget_s=0.1)
    assert lat["runs"] >= 5 and 0 < lat["median"] <= lat["p90"]


class _PerToken(nn.Module):
    """Logits-like ``[B, S, V]`` from token ids, with an attention mask it does not need."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids) * 10


def _left_padded() -> tuple[tuple[()], dict[str, torch.Tensor]]:
    ids = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return (), {"input_ids": ids, "attention_mask": mask}


def _engine(module: nn.Module, at: tuple[int, int], value: float) -> Callable[[Inputs], np.ndarray]:
    """An 'engine' that computes ``module`` exactly except at position ``at`` (row, token)."""
    from potstill.targets.parity import torch_reference

    def run(inputs: Inputs) -> np.ndarray:
        out = torch_reference(module, inputs).copy()
        out[at] = value
        return out

    return run


def test_parity_ignores_positions_the_attention_mask_drops() -> None:
    from potstill.targets.parity import check_parity, raise_if_failed

    module, inputs = _PerToken().eval(), _left_padded()
    tol = load_profile("cpu").tolerance
    # a padded position off by 42 (a left-padded Llama's ONNX engine differs there by tens): ok
    parity = check_parity(module, _engine(module, (0, 1), 42.0), [inputs], tol)
    assert parity["ok"] and parity["max_abs"] == 0.0
    assert parity["positions"] == {"compared": 8, "masked": 2}
    # NaN at a padded position is undefined output, not an error
    assert check_parity(module, _engine(module, (0, 0), float("nan")), [inputs], tol)["ok"]
    # the same error at a kept position fails, and the error names the kept positions
    bad = check_parity(module, _engine(module, (0, 2), 42.0), [inputs], tol)
    assert not bad["ok"] and bad["max_abs"] > 1.0
    with pytest.raises(ParityError, match="8 positions the attention mask keeps"):
        raise_if_failed(bad, "engine", tol)
    # NaN at a kept position still fails
    nan = check_parity(module, _engine(module, (1, 0), float("nan")), [inputs], tol)
    assert not nan["ok"] and nan["nonfinite"] == {"engine": 5, "torch": 0, "input": 0}  # the 5 logits there


def test_parity_rel_is_against_the_kept_positions_scale() -> None:
    from potstill.targets.parity import errors

    ref = np.zeros((1, 3, 2))
    ref[0, 0] = 1000.0  # a huge value at a padded position must not shrink rel
    ref[0, 1:] = 2.0
    eng = ref.copy()
    eng[0, 2, 0] = 3.0
    keep = np.array([[False, True, True]])
    assert errors(eng, ref, keep) == (1.0, 0.5)
    assert errors(eng, ref) == (1.0, 0.001)


def test_pooled_output_is_compared_whole() -> None:
    from potstill.targets.parity import kept_positions

    _, kwargs = _left_padded()
    assert kept_positions(((), kwargs), (2, 5)) is None  # [B, H] with H == S: not per position
    keep = kept_positions(((), kwargs), (2, 5, 7))
    assert keep is not None and keep.sum() == 8
    assert kept_positions(((), kwargs), (2, 4, 7)) is None  # other length: not this mask's positions


def test_sessions_potstill_times_do_not_spin(cnn: nn.Module, tmp_path: Path) -> None:
    """Every timing here runs two sessions in one process, student against teacher; a pool that
    spins after its run takes the cores from the other (one model against itself measured 0.7x to
    2.1x "speed-ups"; ``bench/timing_spin.py``). The profile's session and the sublayer-latency
    sessions sleep when a run ends."""
    from potstill.passes.prune.sublayer_latency import _session
    from potstill.targets.onnxruntime import make_session

    path = tmp_path / "m.onnx"
    torch.onnx.export(cnn, (torch.randn(1, 3, 16, 16),), str(path), input_names=["input"], output_names=["output"],
                      dynamo=False)
    profile_session, _ = make_session(path, load_profile("cpu"))
    block_session, _ = _session("neurons", 4, 8, 16, 1, 4, threads=2)
    for session in (profile_session, block_session):
        opts = session.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert profile_session.get_session_options().intra_op_num_threads == load_profile("cpu").threads


def test_a_students_speedup_is_read_interleaved_with_the_teachers_engine(cnn: nn.Module, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The record pass times the student's engine in rounds alternating with the teacher's engine
    (``potstill.targets.speedup``), so the manifest's speed-up is one reading taken under one load,
    not two medians taken minutes apart (SmolLM2: 3.75x that way on a busy host, 1.52x interleaved).
    Without the teacher's engine (``--no-teacher-timing``, a reused teacher record) the manifest
    falls back to the two medians and says so."""
    from potstill.outputs.manifest import build_manifest

    def compiled(with_teacher: bool, tag: str = "") -> tuple[CompileState, dict]:
        state = CompileState(teacher=cnn, example_inputs=(torch.randn(1, 3, 16, 16),), profile=load_profile("cpu"),
                             out_dir=tmp_path / f"{with_teacher}{tag}", work_dir=tmp_path / f"work-{with_teacher}{tag}")
        if with_teacher:
            PassManager(build_pipeline("record.teacher")).run(state)
        state.students.append(state.new_student("s"))
        PassManager(build_pipeline("lower.onnxruntime,record")).run(state)
        return state, state.students[0].artifacts["record"]

    state, record = compiled(True)
    assert state.shared.engine is not None and state.shared.engine.files["onnx"].is_file()
    timing = record["speedup_timing"]
    assert timing is not None and timing["rounds"] >= 5 and timing["teacher_ms"] > 0 and timing["ms"] > 0
    lo, hi = timing["speedup_iqr"]
    assert lo <= timing["speedup"] <= hi
    teacher = {"latency_ms": {"median": 1.0}}  # a stale teacher median: the reading wins over it
    entry = {"latency_ms": record["latency_ms"], "speedup_timing": timing}
    [got] = build_manifest(teacher, [entry], {}, None, "onnxruntime", {})["students"]
    assert got["speedup"] == timing["speedup"] and got["speedup_method"] == "interleaved"

    _, record = compiled(False)
    assert record["speedup_timing"] is None
    entry = {"latency_ms": record["latency_ms"], "speedup_timing": None}
    [got] = build_manifest(teacher, [entry], {}, None, "onnxruntime", {})["students"]
    assert got["speedup"] == 1.0 / record["latency_ms"]["median"] and got["speedup_method"] == "separate medians"

    # two sessions that would take more than half the free memory: not timed together, and said
    monkeypatch.setattr("potstill.inputs.memory.available_bytes", lambda: 1000)
    _, record = compiled(True, "-tight")
    assert record["speedup_timing"] is None
    assert any("timed apart" in n and "half of the 0.0 GB free" in n for n in record["notes"]), record["notes"]

    # a timing that fails after the work is done leaves the two medians, and says why
    monkeypatch.undo()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no session")

    monkeypatch.setattr("potstill.targets.speedup.engine_callable", broken)
    _, record = compiled(True, "-broken")
    assert record["speedup_timing"] is None
    assert any("interleaved failed (RuntimeError: no session)" in n for n in record["notes"]), record["notes"]
