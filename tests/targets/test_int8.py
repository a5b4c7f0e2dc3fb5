"""INT8 (NNCF static, ONNX Runtime dynamic): kept only when faster and within the parity/accuracy
budget — enforced both ways; tried on the ``cpu`` profile by default, measured on the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from potstill.profiles import DeviceProfile, load_profile
from potstill.targets import lower
from potstill.targets.int8 import decide
from torch import nn


def _conv_net() -> nn.Module:
    """Conv-heavy (64 channels at 32x32): INT8 with VNNI runs it ~3x faster than FP32 here."""
    torch.manual_seed(0)

    def block(c: int) -> list[nn.Module]:
        return [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]

    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), *block(64), *block(64), *block(64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def _int8_profile(precision: str = "int8", **int8: object) -> DeviceProfile:
    base = load_profile("cpu")
    return base.model_copy(update={"precision": precision, "threads": 1,
                                   "int8": base.int8.model_copy(update={"min_macs": 0.0, **int8})})


def _calib() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(4)]


def test_int8_kept_when_within_parity_and_accuracy_budgets(tmp_path: Path) -> None:
    model = _conv_net()
    with torch.no_grad():  # wide logit margins, so top-1 agreement is a real gate on a random net
        model[-1].weight.mul_(50.0)
    # speed is the decision rule's business (test_decision_rule_both_ways); a test never asserts a timing
    art = lower(model, (torch.randn(1, 3, 32, 32),),
                _int8_profile(max_rel_error=0.1, max_accuracy_drop=0.25, require_speedup=False),
                tmp_path, calib=_calib)
    assert art.precision == "int8", art.notes
    qmodel = onnx.load(str(art.files["onnx"]))
    assert any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)
    assert art.files["onnx_fp32"].is_file()
    assert art.parity["ok"] and art.parity["rel"] <= 0.1
    note = next(n for n in art.notes if n.startswith("kept INT8"))
    assert "FP32" in note and "speed-up" in note and "calibration samples from the calibration data" in note


def test_int8_rejected_over_parity_budget(tmp_path: Path) -> None:
    model = _conv_net()
    art = lower(model, (torch.randn(1, 3, 32, 32),), _int8_profile(max_rel_error=1e-7), tmp_path)
    assert art.precision == "fp32"
    assert not (tmp_path / "model.int8.onnx").exists()
    note = next(n for n in art.notes if n.startswith("kept FP32"))
    assert "INT8 rejected" in note and "parity: rel" in note and "vs FP32" in note
    assert art.parity["ok"] and art.parity["int8"]["rel"] > 1e-7
    assert art.latency_ms["int8_median"] > 0 and art.latency_ms["int8_speedup"] > 0


def test_decision_rule_both_ways() -> None:
    profile = _int8_profile(max_rel_error=0.05, max_accuracy_drop=0.01, min_speedup=1.2)
    assert decide(profile, fp32_ms=3.0, int8_ms=1.0, rel=0.01, disagreement=0.0).keep
    slow = decide(profile, fp32_ms=3.0, int8_ms=2.8, rel=0.01, disagreement=0.0)
    assert not slow.keep and "speed-up" in slow.reasons[0]
    wrong = decide(profile, fp32_ms=3.0, int8_ms=1.0, rel=0.01, disagreement=0.2)
    assert not wrong.keep and "disagreement" in wrong.reasons[0]
    loose = _int8_profile(require_speedup=False)
    assert decide(loose, fp32_ms=1.0, int8_ms=2.0, rel=0.01, disagreement=None).keep


def test_quantize_pass_records_decision(tmp_path: Path) -> None:
    from potstill.pipeline import PassManager, build_pipeline
    from potstill.state import CompileState

    model = _conv_net()
    state = CompileState(teacher=model, example_inputs=(torch.randn(1, 3, 32, 32),),
                         profile=_int8_profile(min_speedup=1000.0), out_dir=tmp_path)
    PassManager(build_pipeline("quantize.int8{calibration_samples=8}")).run(state)
    art = state.students[0].artifacts["onnxruntime"]
    assert {"quantized", "lowered"} <= state.facts
    assert art.precision == "fp32" and any("not faster enough" in n for n in art.notes)


def test_int8_transformer_like_runs(encoder: nn.Module, token_inputs: dict, tmp_path: Path) -> None:
    """A graph of matrix products is quantised dynamically (ONNX Runtime: integer MatMuls, activation
    scales per batch), a conv net statically (NNCF Q/DQ, the test above)."""
    profile = _int8_profile(require_speedup=False, max_rel_error=0.1)
    art = lower(encoder, (), profile, tmp_path, example_kwargs=token_inputs)
    assert art.precision == "int8" and art.parity["ok"] and art.parity["rel"] <= 0.1
    ops = {n.op_type for n in onnx.load(str(art.files["onnx"])).graph.node}
    assert "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops, ops
    assert any("INT8 (dynamic, ONNX Runtime)" in n for n in art.notes), art.notes


def test_quantization_mode_reads_the_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from potstill.errors import InputError
    from potstill.targets import int8
    from potstill.targets.int8 import quantization_modes

    conv = lower(_conv_net(), (torch.randn(1, 3, 32, 32),), load_profile("cpu"), tmp_path / "conv")
    mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    dense = lower(mlp, (torch.randn(2, 16),), load_profile("cpu"), tmp_path / "mlp")
    assert quantization_modes(conv.files["onnx"], "auto") == ["static"]
    assert quantization_modes(dense.files["onnx"], "auto") == ["dynamic", "weight-only"]
    assert quantization_modes(dense.files["onnx"], "static") == ["static"]
    # an onnxruntime that cannot write 8-bit MatMulNBits: auto leaves weight-only out, and asking for it is an error
    monkeypatch.setattr(int8, "weight_only_available", lambda: False)
    assert quantization_modes(dense.files["onnx"], "auto") == ["dynamic"]
    told = lower(mlp, (torch.randn(2, 16),), _int8_profile("fp32", on_fp32=True), tmp_path / "old-ort")
    assert any(n.startswith("weight-only INT8 not tried: onnxruntime") for n in told.notes), told.notes
    with pytest.raises(InputError, match=r"int8\.mode weight-only needs 8-bit MatMulNBits"):
        quantization_modes(dense.files["onnx"], "weight-only")
    # the compile says so before loading the teacher, with exit code 2 (not after pruning, at the lowering)
    import yaml
    from potstill.cli import main

    profile = _int8_profile("fp32", on_fp32=True, mode="weight-only").to_dict() | {"name": "old-ort"}
    (tmp_path / "old-ort.yaml").write_text(yaml.safe_dump(profile))
    teacher = Path(__file__).resolve().parents[2] / "examples" / "digits_cnn.py"
    code = main(["compile", f"{teacher}:teacher", "--profile", str(tmp_path / "old-ort.yaml"),
                 "-o", str(tmp_path / "out")])
    said = capsys.readouterr()
    assert code == 2 and "int8.mode weight-only needs 8-bit MatMulNBits" in said.err + said.out, said
    assert "loading teacher" not in said.err + said.out and not (tmp_path / "out").exists()


def test_models_under_min_macs_are_not_quantised(tmp_path: Path) -> None:
    """The ``cpu`` profile tries INT8 (``int8.on_fp32``) only from 50M MACs on the example: the
    test suite's tiny models stay FP32, EfficientNet-Lite0 (0.4G) and MiniLM (0.35G) are tried."""
    cpu = load_profile("cpu")
    assert cpu.precision == "fp32" and cpu.int8.on_fp32 and cpu.int8.min_macs == 5e7
    small = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    art = lower(small, (torch.randn(1, 3, 16, 16),), cpu, tmp_path / "small")
    assert art.precision == "fp32" and not (tmp_path / "small" / "model.int8.onnx").exists()
    assert any("INT8 not tried" in n and "int8.min_macs" in n for n in art.notes), art.notes
    # the same gate, lowered: the conv net (115M MACs) is tried and judged
    tried = lower(_conv_net(), (torch.randn(1, 3, 32, 32),), _int8_profile("fp32", on_fp32=True, min_macs=5e7,
                  require_speedup=False, max_accuracy_drop=1.0), tmp_path / "big")  # fmt: skip
    assert not any("INT8 not tried" in n for n in tried.notes) and tried.precision == "int8", tried.notes


def test_an_int8_students_fidelity_is_its_engines_and_the_teacher_reference_stays_fp32(tmp_path: Path) -> None:
    """With INT8 tried on an FP32 profile (``int8.on_fp32``, the ``cpu`` default), the teacher's
    engine, the reference every speed-up is read against, stays FP32, and an INT8 student's fidelity
    is measured on its engine: an unpruned student whose PyTorch module is the teacher has KL 0 to
    it, its INT8 engine more (quantisation error is part of what the student lost)."""
    from potstill.pipeline import PassManager, build_pipeline
    from potstill.state import CompileState

    model = _conv_net()
    with torch.no_grad():
        model[-1].weight.mul_(50.0)
    data = _calib()
    profile = _int8_profile("fp32", on_fp32=True, require_speedup=False, max_rel_error=1.0, max_accuracy_drop=1.0)
    state = CompileState(teacher=model, example_inputs=(torch.randn(1, 3, 32, 32),), profile=profile,
                         out_dir=tmp_path / "out", work_dir=tmp_path / "work", calib_data=lambda: iter(data[:2]),
                         heldout_data=lambda: iter(data[2:]))  # fmt: skip
    PassManager(build_pipeline("record.teacher")).run(state)
    assert state.shared.engine.precision == "fp32" and state.shared.record["precision"] == "fp32"
    state.students.append(state.new_student("s"))
    PassManager(build_pipeline("lower.onnxruntime,record")).run(state)
    student = state.students[0]
    assert student.artifacts["record"]["precision"] == "int8"
    assert student.metrics["fidelity_fp32"]["measures"]["kl"] == 0.0  # the module is the teacher
    assert student.metrics["fidelity"]["measures"]["kl"] > 1e-6  # the engine is INT8
    assert any("fidelity is the INT8 engine's" in n for n in student.artifacts["record"]["notes"])
    from potstill.outputs.report import table_rows

    _, rows = table_rows({"teacher": {}, "students": [{"name": "s", "precision": "int8"}, {"name": "t", "precision": "fp32"}]})
    assert [r[0] for r in rows] == ["teacher", "s int8", "t"]


def test_a_language_models_int8_is_judged_by_its_next_token_predictions() -> None:
    """Logits ``[batch, sequence, vocab]`` of a language model: INT8 is judged by next-token
    agreement at the positions the attention mask keeps (SmolLM2-135M's dynamic INT8 kept only
    0.44 of them, though every logit was within a 10 % relative error bound's reach)."""
    from potstill.targets.int8 import top1_disagreement

    torch.manual_seed(0)
    lm = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50)).eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    with torch.no_grad():
        logits = lm(ids).numpy()

    class Masked(nn.Module):  # the LM's signature with an attention mask, as a causal LM takes it
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return lm(input_ids)

    def flipped(at: tuple[int, int]):  # an engine whose prediction differs at one position
        def run(_: object) -> np.ndarray:
            out = logits.copy()
            out[at][np.argmax(out[at])] = out[at].min() - 1.0
            return out
        return run

    item = ((), {"input_ids": ids, "attention_mask": mask})
    assert top1_disagreement(Masked(), flipped((0, 0)), [item], tokens=True) == 0.0  # a padded position
    assert top1_disagreement(Masked(), flipped((1, 3)), [item], tokens=True) == 1 / 10
    assert top1_disagreement(Masked(), flipped((1, 3)), [item]) is None  # not a classifier's [batch, classes]


def test_macs_are_counted_on_models_that_return_a_parameter() -> None:
    """The gate's MACs count (torch's FLOP counter): a Linear of 16 -> 32 on 2 rows is 1,024 MACs,
    also when the module returns one of its parameters (DeBERTa's relative embeddings did, and the
    counter's grad hooks failed on it), and the parameters still require grad afterwards."""
    from potstill.targets.int8 import example_macs

    class WithTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.table = nn.Linear(16, 32), nn.Parameter(torch.randn(4, 32))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lin(x), self.table

    model = WithTable()
    assert example_macs(model, ((torch.randn(2, 16),), {})) == 2 * 16 * 32
    assert all(p.requires_grad for p in model.parameters())


def test_a_language_model_on_real_text_is_judged_by_perplexity() -> None:
    """With a perplexity ratio, logits' rel and next-token disagreement no longer decide; NaN fails it."""
    profile = _int8_profile(max_rel_error=0.1, max_accuracy_drop=0.05, max_perplexity_ratio=1.05, min_speedup=1.1)
    kept = decide(profile, fp32_ms=3.0, int8_ms=2.0, rel=0.3, disagreement=0.2, ppl_ratio=1.03)
    assert kept.keep, kept.reasons
    worse = decide(profile, fp32_ms=3.0, int8_ms=2.0, rel=0.01, disagreement=0.0, ppl_ratio=1.2)
    assert not worse.keep and worse.reasons == [worse.reasons[0]] and "int8.max_perplexity_ratio" in worse.reasons[0]
    assert not decide(profile, 3.0, 2.0, 0.01, 0.0, ppl_ratio=float("nan")).keep
    assert not decide(profile, 3.0, 2.0, float("nan"), None).keep  # NaN parity fails too
    slow = decide(profile, fp32_ms=3.0, int8_ms=2.9, rel=0.01, disagreement=0.0, ppl_ratio=1.0)
    assert not slow.keep and slow.reasons[0].startswith("not faster enough")


class _TokenLM(nn.Module):
    """``[batch, sequence, vocab]`` logits from ``input_ids`` alone: a next-token model with a known answer."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def test_perplexity_ratio_has_the_known_answer_and_reads_only_kept_positions() -> None:
    from potstill.targets.int8 import perplexity_ratio

    model = _TokenLM().eval()
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: pairs touching it do not count
    item = ((), {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        ref = model(ids, mask)
    assert perplexity_ratio(model, lambda _: ref.numpy(), [item]) == pytest.approx(1.0)
    uniform = np.zeros(tuple(ref.shape), np.float32)  # perplexity of uniform logits is the vocabulary's size
    pair = (mask[:, :-1] & mask[:, 1:]).bool()
    nll = -torch.log_softmax(ref[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)[pair]
    expected = 11 / float(nll.mean().exp())
    assert perplexity_ratio(model, lambda _: uniform, [item]) == pytest.approx(expected, rel=1e-6)
    junk = ref.numpy().copy()
    junk[0, :2] = 1e4  # the padded positions' logits are undefined: they must not move the answer
    assert perplexity_ratio(model, lambda _: junk, [item]) == pytest.approx(1.0)
    broken = ref.numpy().copy()
    broken[1, 3, 0] = np.nan  # a kept position: no number stands for it
    assert np.isnan(perplexity_ratio(model, lambda _: broken, [item]))
    images = ((torch.randn(2, 3),), {})  # not token ids: no perplexity
    assert perplexity_ratio(nn.Linear(3, 4), lambda _: np.zeros((2, 4)), [images]) is None


def test_a_tied_head_is_folded_into_a_constant_the_quantiser_converts(tmp_path: Path) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from potstill.targets.int8 import fold_weight_transposes, quantize_weight_only_onnx

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((64, 128)).astype(np.float32)  # [vocab, hidden], read transposed by the head
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]), helper.make_node("MatMul", ["x", "emb_t"], ["y"])],
        "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], [numpy_helper.from_array(emb, "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "tied.onnx"))
    x = rng.standard_normal((4, 128)).astype(np.float32)
    folded = onnx.load(str(tmp_path / "tied.onnx"))
    assert fold_weight_transposes(folded) == 1 and not any(n.op_type == "Transpose" for n in folded.graph.node)
    got = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ emb.T, rtol=1e-5, atol=1e-4)
    quantize_weight_only_onnx(tmp_path / "tied.onnx", tmp_path / "tied.int8.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "tied.int8.onnx")).graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops, ops
    q = ort.InferenceSession(str(tmp_path / "tied.int8.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(q - x @ emb.T).max() / np.abs(x @ emb.T).max() < 0.05  # 8-bit weights: close, not equal


@pytest.fixture
def tiny_lm(tmp_path: Path) -> tuple[nn.Module, dict[str, Any], list[dict[str, torch.Tensor]]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=256, vocab_size=256, max_position_embeddings=64,
                                   tie_word_embeddings=True)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)  # confident logits (the head is tied): text it predicts well
    model.save_pretrained(tmp_path / "hf")
    gen = torch.Generator().manual_seed(5)
    calib = []
    for _ in range(3):  # the model's own greedy text: any quantisation error raises its perplexity
        prompt = torch.randint(0, 256, (2, 4), generator=gen)
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             pad_token_id=0)  # fmt: skip
        calib.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return model, {"path": str(tmp_path / "hf"), "task": "text-generation"}, calib


def test_weight_only_int8_of_a_decoder_is_judged_by_perplexity(
    tiny_lm: tuple[nn.Module, dict[str, Any], list[dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    model, hf, calib = tiny_lm
    profile = _int8_profile(mode="weight-only", require_speedup=False, max_perplexity_ratio=1.05)
    art = lower(model, (), profile, tmp_path / "wo", example_kwargs=calib[0], calib=calib, hf=hf)
    assert art.precision == "int8", art.notes
    ops = {n.op_type for n in onnx.load(str(art.files["onnx"])).graph.node}
    assert "MatMulNBits" in ops and "DynamicQuantizeLinear" not in ops, ops
    assert 0.95 < art.parity["ppl_ratio"] <= 1.05 and art.parity["ok"]
    assert any("INT8 (weight-only, ONNX Runtime)" in n and "perplexity" in n for n in art.notes), art.notes


def test_auto_tries_weight_only_where_dynamic_is_rejected(
    tiny_lm: tuple[nn.Module, dict[str, Any], list[dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    model, hf, calib = tiny_lm
    exact = _int8_profile(require_speedup=False, max_perplexity_ratio=1.0 + 1e-9)  # no quantiser is this exact
    art = lower(model, (), exact, tmp_path / "exact", example_kwargs=calib[0], calib=calib, hf=hf)
    assert art.precision == "fp32"
    tried = [n for n in art.notes if "INT8 rejected" in n]
    assert len(tried) == 2 and "(dynamic" in tried[0] and "(weight-only" in tried[1], art.notes
    assert tried[-1].startswith("kept FP32") and all("int8.max_perplexity_ratio" in n for n in tried)
    # too slow is a reason to try the next mode too: weight-only can pay at a batch where dynamic does not
    unreachable = _int8_profile(min_speedup=100.0, max_perplexity_ratio=10.0)
    art = lower(model, (), unreachable, tmp_path / "slow", example_kwargs=calib[0], calib=calib, hf=hf)
    tried = [n for n in art.notes if "INT8 rejected" in n]
    assert art.precision == "fp32" and len(tried) == 2 and all("not faster enough" in n for n in tried), art.notes
    assert "(dynamic" in tried[0] and "(weight-only" in tried[1]
    loose = _int8_profile(require_speedup=False, max_perplexity_ratio=10.0)  # dynamic passes: no second mode
    art = lower(model, (), loose, tmp_path / "loose", example_kwargs=calib[0], calib=calib, hf=hf)
    assert art.precision == "int8" and not any("INT8 rejected" in n for n in art.notes), art.notes
    assert any("INT8 (dynamic, ONNX Runtime)" in n for n in art.notes)
    assert not any("weight-only INT8 not tried" in n for n in art.notes)



@pytest.mark.parametrize("saturate", [True, False])
def test_weights_take_seven_bits_where_the_cpu_products_saturate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                saturate: bool) -> None:
    """Without VNNI an x86 CPU's u8 x s8 products saturate for large weights (on an AVX2 host, dynamic
    INT8 of SmolLM2-135M got no next token right): dynamic INT8 then writes weights in [-64, 63]
    (``reduce_range``), and NNCF's static quantiser every conv and product weight the same
    range (its overflow fix, by default on the first convolution only); elsewhere 8 bits are kept."""
    from onnx import numpy_helper
    from potstill.targets import int8

    monkeypatch.setattr(int8, "products_saturate", lambda: saturate)
    fp32 = load_profile("cpu").unquantised()

    def peak(model: onnx.ModelProto, ndim: int, count: int) -> int:
        """The largest quantised weight's magnitude (the int8 initializers of that rank: not zero points)."""
        weights = [w for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8
                   and (w := numpy_helper.to_array(i)).ndim == ndim]
        assert len(weights) == count, [w.shape for w in weights]
        return max(int(np.abs(w.astype(np.int32)).max()) for w in weights)

    mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    dense = lower(mlp, (torch.randn(2, 16),), fp32, tmp_path / "mlp").files["onnx"]
    dynamic = peak(onnx.load(str(int8.quantize_dynamic_onnx(dense, tmp_path / "dynamic.onnx"))), 2, 2)
    assert (dynamic <= 64) == saturate and dynamic >= 63, dynamic

    conv = lower(_conv_net(), (torch.randn(1, 3, 32, 32),), fp32, tmp_path / "conv").files["onnx"]
    name = onnx.load(str(conv), load_external_data=False).graph.input[0].name
    feeds = [{name: x.numpy()} for x in _calib()]
    static = peak(onnx.load(str(int8.quantize_onnx(conv, tmp_path / "static.onnx", feeds, 16))), 4, 4)
    assert (static <= 64) == saturate and static >= 63, static


def test_probing_for_weight_only_leaves_the_root_logger_as_it_was() -> None:
    """onnxruntime's MatMulNBits quantiser calls ``logging.basicConfig(level=INFO)`` when imported;
    every transformer compile probes for it, and before this check every library's INFO lines
    (onnxscript, onnx_ir, matplotlib) then reached the console. A fresh interpreter: the import
    happens once per process."""
    import logging
    import subprocess
    import sys

    code = ("import logging; from potstill.targets.int8 import quantize_weight_only_onnx, weight_only_available; "
            "weight_only_available(); root = logging.getLogger(); print(len(root.handlers), root.level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", str(logging.WARNING)], out
