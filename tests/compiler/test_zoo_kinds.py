"""One fast test per failure kind the registry sweep (``bench/zoo_sweep.py``) found and that is now
fixed, each on a tiny config built by the sweep's own ``tiny_config``: task heads load as their own
class and every output reaches the engine, audio models get waveforms, encoder-decoders get
``decoder_input_ids`` and both stacks are analysed, ALiBi pins the heads it biases, and a
weight-normalised conv records and reloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from potstill.inputs.hf import hf_task
from potstill.inputs.teacher import load_hf_teacher
from potstill.ir.capture import analyze

from .zoo_sweep_lib import TASKS, build_tiny, registry, tiny_config


def _saved(model_type: str, cls: str, root: Path) -> Path:
    path = root / model_type
    build_tiny(model_type, cls).save_pretrained(path)
    return path


def test_audio_teacher_takes_a_waveform(tmp_path):
    t = load_hf_teacher(str(_saved("wav2vec2", "Wav2Vec2ForSequenceClassification", tmp_path)))
    assert type(t.module).__name__ == "Wav2Vec2ForSequenceClassification"
    assert list(t.example_kwargs) == ["input_values"] and t.example_kwargs["input_values"].shape == (1, 16000)


@pytest.mark.parametrize(("arch", "task", "auto"), [
    ("BertForQuestionAnswering", "question-answering", "AutoModelForQuestionAnswering"),
    ("RobertaForTokenClassification", "token-classification", "AutoModelForTokenClassification"),
    ("Wav2Vec2ForSequenceClassification", "audio-classification", "AutoModelForAudioClassification"),
    ("T5ForConditionalGeneration", "text2text-generation", "AutoModelForSeq2SeqLM"),
    ("GPT2LMHeadModel", "text-generation", "AutoModelForCausalLM"),
    ("BertModel", "feature-extraction", "AutoModel"),
])  # fmt: skip
def test_every_head_maps_to_the_auto_class_that_builds_it(arch, task, auto):
    assert hf_task([arch]) == (task, auto)


def test_registry_and_tiny_configs_cover_every_task():
    rows = registry()
    assert {t for t, _, _ in rows} == set(TASKS)
    assert len(rows) > 500  # transformers 4.57 ships ~900 auto classes; a list would be a few dozen
    cfg = tiny_config("llama")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (64, 2, 4, 256)
    assert cfg.num_key_value_heads in (2, 4) and cfg.intermediate_size == 128


def test_question_answering_teacher_is_the_head_with_both_outputs(tmp_path):
    from potstill.targets.onnx_export import ordered_outputs

    t = load_hf_teacher(str(_saved("bert", "BertForQuestionAnswering", tmp_path)))
    assert type(t.module).__name__ == "BertForQuestionAnswering"
    with torch.no_grad():
        out = t.module(**t.example_kwargs)
    names, tensors, _ = ordered_outputs(out)
    assert names == ["output", "output.end_logits"]
    assert tensors[0] is out.start_logits and tuple(tensors[1].shape) == tuple(t.example_kwargs["input_ids"].shape)


@pytest.mark.slow
def test_question_answering_engine_returns_start_and_end_logits(tmp_path):
    import onnxruntime as ort
    from potstill.targets.onnx_export import export_onnx

    t = load_hf_teacher(str(_saved("bert", "BertForQuestionAnswering", tmp_path)))
    assert type(t.module).__name__ == "BertForQuestionAnswering"
    exported = export_onnx(t.module, (), tmp_path / "qa.onnx", dict(t.example_kwargs))
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    ids = torch.randint(3, 200, (2, 9))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})
    with torch.no_grad():
        want = t.module(**{k: v for k, v in feeds.items() if k in names})
    assert [o.name for o in session.get_outputs()] == ["output", "output.end_logits"]
    np.testing.assert_allclose(got[0], want.start_logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(got[1], want.end_logits.numpy(), atol=1e-5)
    assert got[0].shape == (2, 9)


@pytest.mark.slow
def test_audio_model_gets_a_waveform_and_a_dynamic_length_engine(tmp_path):
    import onnxruntime as ort
    from potstill.ir.surgery import prune_width
    from potstill.outputs.students_io import load_student, save_student
    from potstill.targets.onnx_export import export_onnx

    path = _saved("wav2vec2", "Wav2Vec2ForSequenceClassification", tmp_path)
    t = load_hf_teacher(str(path))
    assert list(t.example_kwargs) == ["input_values"] and t.example_kwargs["input_values"].shape == (1, 16000)
    a = analyze(t.module, (), t.example_kwargs)
    # the positional conv is weight-normalised (a parametrized module): prune the FFN and reload it
    ffn = next(g for g in a.prunable() if g.kind == "neurons")
    student = prune_width(t.module, a, {ffn.id: list(range(ffn.n_units // 2))})
    teacher = {"spec": f"hf:{path}", "hf": {"path": str(path), "task": "audio-classification",
                                            "auto_class": "AutoModelForAudioClassification"}}
    save_student(student, tmp_path / "student", teacher=teacher)
    again = load_student(tmp_path / "student")
    exported = export_onnx(again, (), tmp_path / "a.onnx", dict(t.example_kwargs))
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    wave = torch.randn(2, 9000)  # another batch and length than the 1 x 16000 example
    with torch.no_grad():
        want = student(input_values=wave).logits.numpy()
    np.testing.assert_allclose(session.run(None, {"input_values": wave.numpy()})[0], want, atol=1e-4)


def test_encoder_decoder_gets_decoder_ids_and_both_stacks_are_prunable(tmp_path):
    t = load_hf_teacher(str(_saved("t5", "T5ForConditionalGeneration", tmp_path)))
    ids, dec = t.example_kwargs["input_ids"], t.example_kwargs["decoder_input_ids"]
    config = t.module.config
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
    assert dec.shape == ids.shape and int(dec[0, 0]) == start and torch.equal(dec[0, 1:], ids[0, :-1])
    a = analyze(t.module, (), t.example_kwargs)
    owners = {m.param.split(".")[0] for g in a.prunable() for m in g.members if g.kind in ("heads", "neurons")}
    assert {"encoder", "decoder"} <= owners


def test_alibi_bias_pins_the_heads_it_is_added_to(tmp_path):
    t = load_hf_teacher(str(_saved("bloom", "BloomModel", tmp_path)))
    a = analyze(t.module, (), t.example_kwargs)
    heads = [g for g in a.groups if g.kind == "heads"]
    assert heads and all(g.pinned and "baddbmm" in g.pinned for g in heads)
    assert any(g.kind == "neurons" for g in a.prunable())  # the MLPs are still pruned


# ---------------------------------------------------------------------------------------------
# Head pruning that the attention's own forward must follow


class _Attention(nn.Module):
    """Multi-head self-attention whose output reshape is sized by an attribute (``embed_dim``,
    which surgery updates) or by the input's width (which no attribute can change)."""

    def __init__(self, width: int, heads: int, reshape_to_input: bool) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = width, heads, width // heads
        self.reshape_to_input = reshape_to_input
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, width = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, -1) @ v
        return x + self.out_proj(out.transpose(1, 2).reshape(b, t, width if self.reshape_to_input else self.embed_dim))


@pytest.mark.parametrize("reshape_to_input", [False, True])
def test_heads_are_pinned_only_where_the_forward_cannot_follow_their_removal(reshape_to_input):
    from potstill.ir.surgery import prune_width

    torch.manual_seed(0)
    model = nn.Sequential(_Attention(32, 4, reshape_to_input), _Attention(32, 4, reshape_to_input)).eval()
    x = torch.randn(2, 5, 32)
    a = analyze(model, (x,))
    heads = [g for g in a.groups if g.kind == "heads"]
    assert len(heads) == 2
    if reshape_to_input:  # SigLIP-like: the reshape reads the input's width, which stays 32
        assert all(g.pinned and "_Attention's forward fails once a head is removed" in g.pinned for g in heads)
        return
    assert all(g.pinned is None for g in heads)
    student = prune_width(model, a, {g.id: [0, 2] for g in heads})
    assert (student[0].num_heads, student[0].embed_dim, student[0].q_proj.out_features) == (2, 16, 16)
    with torch.no_grad():
        assert student(x).shape == x.shape


def _compile_reload_parity(model_type: str, cls: str, root: Path,
                           kinds: tuple[str, ...] = ("heads", "kv_heads", "neurons")) -> tuple[list, torch.nn.Module]:
    """Prune half of every prunable group of these kinds in the tiny class, save, reload, lower to
    ONNX at the example's shape and check the engine against the reloaded student on other
    values. Returns the head groups and the reloaded student."""
    import onnxruntime as ort
    from potstill.ir.surgery import prune_width
    from potstill.outputs.students_io import load_student, save_student
    from potstill.targets.onnx_export import export_onnx, ordered_outputs

    path = _saved(model_type, cls, root)
    t = load_hf_teacher(str(path))
    a = analyze(t.module, (), t.example_kwargs)
    heads = [g for g in a.groups if g.kind in ("heads", "kv_heads")]
    chosen = [g for g in a.prunable() if g.kind in kinds and g.n_units > 1]
    assert any(g.kind == kinds[-1] for g in chosen)
    student = prune_width(t.module, a, {g.id: list(range(max(1, g.n_units // 2))) for g in chosen})
    teacher = {"spec": f"hf:{path}", "hf": t.hf}
    save_student(student, root / "student", teacher=teacher)
    again = load_student(root / "student")
    assert type(again).__name__ == cls
    exported = export_onnx(again, (), root / "s.onnx", dict(t.example_kwargs), dynamic_sequence=False)
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(5)
    feeds = {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
             for k, v in t.example_kwargs.items()}
    names = [i.name for i in session.get_inputs()]
    with torch.no_grad():
        _, want, _ = ordered_outputs(again(**feeds))
        _, direct, _ = ordered_outputs(student(**feeds))
    got = session.run(None, {k: feeds[k].numpy() for k in names})
    assert len(got) == len(want)
    for g, w, d in zip(got, want, direct):
        np.testing.assert_allclose(w.numpy(), d.numpy(), atol=1e-5)  # the reload is the student
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4)
    return heads, again


@pytest.mark.slow
def test_bart_like_heads_prune_and_reload_with_embed_dim_updated(tmp_path):
    # MVP reshapes its concatenated heads to ``self.embed_dim``: surgery keeps it equal to them
    heads, student = _compile_reload_parity("mvp", "MvpForQuestionAnswering", tmp_path)
    assert heads and all(g.pinned is None for g in heads)
    attn = student.model.encoder.layers[0].self_attn
    assert attn.embed_dim == attn.num_heads * attn.head_dim == attn.q_proj.out_features < 64


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "cls", "attention"), [
    ("wavlm", "WavLMForSequenceClassification", "WavLMAttention"),  # gated bias splits the residual by heads
    ("siglip", "SiglipForImageClassification", "SiglipAttention"),  # reshapes to the input's width
])  # fmt: skip
def test_heads_the_forward_cannot_follow_are_pinned_and_the_rest_prunes(model_type, cls, attention, tmp_path):
    heads, _ = _compile_reload_parity(model_type, cls, tmp_path)
    four = [g for g in heads if g.n_units == 4]
    assert four and all(g.pinned and f"{attention}'s forward fails once a head is removed" in g.pinned for g in four)


@pytest.mark.slow
def test_a_model_whose_input_embeddings_accessor_fails_still_prunes(tmp_path):
    # PoolFormer's get_input_embeddings reads ``self.embeddings``, which its model never defines
    heads, student = _compile_reload_parity("poolformer", "PoolFormerForImageClassification", tmp_path,
                                            kinds=("channels",))
    assert not heads
    with pytest.raises(AttributeError):
        student.get_input_embeddings()


LLAMA_FACTORY = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def teacher():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()

def example_inputs():
    return (torch.randint(0, 256, (1, 16)),)
"""


@pytest.mark.slow
def test_a_llama_from_a_file_factory_compiles_and_writes_student_pt2(tmp_path):
    # the config keeps transformers' default use_cache=True and the example ids are positional
    import importlib.util

    from potstill.driver import compile_teacher
    from potstill.outputs.students_io import load_student
    from potstill.plan import CompileOptions

    path = tmp_path / "llama_factory.py"
    path.write_text(LLAMA_FACTORY)
    said: list[str] = []
    res = compile_teacher(CompileOptions(teacher=f"{path}:teacher", out=str(tmp_path / "out"), profile="cpu",
                                         ratios=(0.5,), distill=False, teacher_timing=False), note=said.append)
    assert any("use_cache=True" in line for line in said)
    entry = res.manifest["students"][0]
    assert entry["files"].get("pt2") == "student.pt2", entry["notes"]
    spec = importlib.util.spec_from_file_location("llama_factory", path)
    assert spec is not None and spec.loader is not None
    factory_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(factory_module)
    student = load_student(res.out / entry["dir"], factory=factory_module.teacher)
    program = torch.export.load(str(res.out / entry["dir"] / "student.pt2")).module()
    ids = torch.randint(0, 256, (3, 16))  # another batch than the compile's
    with torch.no_grad():
        torch.testing.assert_close(program(ids)["logits"], student(ids).logits, atol=1e-4, rtol=1e-4)
