"""Loading teachers (file factories and Hugging Face directories) and calibration data."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from potstill.errors import InputError
from potstill.inputs.calibration import load_calibration, text_calib_batches
from potstill.inputs.corpus import docstring_corpus
from potstill.inputs.data import iter_batches
from potstill.inputs.hf import hf_task
from potstill.inputs.teacher import load_teacher, parse_input_shape
from torch import nn

REPO = Path(__file__).resolve().parents[2]

TINY_CNN = """
import torch
from torch import nn

def factory():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))
"""


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# ---------------------------------------------------------------------------------------------
# path/to/file.py:FACTORY


def test_file_teacher_with_example_inputs_and_hooks(tmp_path: Path) -> None:
    path = write(tmp_path, "withinputs.py", TINY_CNN + """
def example_inputs():
    return (torch.ones(2, 3, 8, 8),)

def calib_data():
    yield torch.zeros(4, 3, 8, 8)

def metric(model):
    return 0.5
""")
    t = load_teacher(f"{path}:factory")
    assert isinstance(t.module, nn.Sequential)
    assert not t.module.training  # eval mode
    assert len(t.example_inputs) == 1 and t.example_inputs[0].shape == (2, 3, 8, 8)
    assert t.example_kwargs == {} and t.hf is None
    assert t.label == "withinputs.py:factory"
    assert t.sources == [path.resolve()]
    assert set(t.hooks) == {"calib_data", "metric"}
    assert t.module(*t.example_inputs).shape == (2, 4)


def test_file_teacher_dict_inputs_become_kwargs(tmp_path: Path) -> None:
    path = write(tmp_path, "kwinputs.py", """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
    def forward(self, x, scale=1.0):
        return self.fc(x) * scale

def factory():
    return Net()

def example_inputs():
    return {"x": torch.ones(1, 4)}
""")
    t = load_teacher(f"{path}:factory")
    assert t.example_inputs == () and set(t.example_kwargs) == {"x"}


def test_input_shapes_give_seeded_float_inputs(tmp_path: Path) -> None:
    path = write(tmp_path, "noinputs.py", TINY_CNN)
    a = load_teacher(f"{path}:factory", ["1x3x16x16"], seed=3)
    b = load_teacher(f"{path}:factory", ["1x3x16x16"], seed=3)
    assert a.example_inputs[0].shape == (1, 3, 16, 16)
    assert a.example_inputs[0].dtype == torch.float32
    torch.testing.assert_close(a.example_inputs[0], b.example_inputs[0])


def test_profile_shapes_serve_a_file_without_inputs(tmp_path: Path) -> None:
    path = write(tmp_path, "noinputs2.py", TINY_CNN)
    t = load_teacher(f"{path}:factory", default_shapes=["1x3x12x12"])
    assert t.example_inputs[0].shape == (1, 3, 12, 12)


def test_missing_inputs_error_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path, "bare.py", TINY_CNN)
    with pytest.raises(InputError) as e:
        load_teacher(f"{path}:factory")
    msg = str(e.value)
    assert str(path) in msg
    assert "def example_inputs()" in msg
    assert "--input-shape" in msg


@pytest.mark.parametrize(
    ("spec_suffix", "fragment"),
    [
        (":nothing", "defines no callable 'nothing'"),
        (":not_a_module", "must return a torch.nn.Module"),
        (":raises", "raises() raised RuntimeError: broken weights"),
    ],
)
def test_bad_factories_are_named(tmp_path: Path, spec_suffix: str, fragment: str) -> None:
    path = write(tmp_path, "bad.py", TINY_CNN + """
def not_a_module():
    return 3

def raises():
    raise RuntimeError("broken weights")
""")
    with pytest.raises(InputError) as e:
        load_teacher(f"{path}{spec_suffix}", ["1x3x8x8"])
    assert fragment in str(e.value)


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"expected path/to/file.py:FACTORY or hf:PATH"):
        load_teacher("model.py")
    with pytest.raises(InputError, match=r"hf:"):
        load_teacher(f"{tmp_path}:factory")  # a directory: did the user mean hf:?
    with pytest.raises(InputError, match="no such file"):
        load_teacher(f"{tmp_path / 'missing.py'}:factory")
    with pytest.raises(InputError, match="not a Python file"):
        load_teacher(f"{tmp_path / 'weights.pt'}:factory")
    path = write(tmp_path, "syntax.py", "def factory(:\n")
    with pytest.raises(InputError, match="importing it failed"):
        load_teacher(f"{path}:factory")


@pytest.mark.parametrize(("text", "shape"), [("1x3x224x224", (1, 3, 224, 224)), ("8", (8,)), ("2X4", (2, 4))])
def test_parse_input_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1x", "axb", "1x0x3", "-1x3"])
def test_parse_input_shape_rejects(text: str) -> None:
    with pytest.raises(InputError, match="--input-shape"):
        parse_input_shape(text)


def test_bundled_example_teacher_is_accurate() -> None:
    t = load_teacher(f"{REPO / 'examples' / 'digits_cnn.py'}:teacher")
    assert t.example_inputs[0].shape == (1, 1, 16, 16)
    assert set(t.hooks) == {"calib_data", "train_data", "eval_data", "metric"}
    assert t.hooks["metric"](t.module) > 0.95
    x, y = next(iter(t.hooks["calib_data"]()))
    assert x.shape[1:] == (1, 16, 16) and y.dtype == torch.long


# ---------------------------------------------------------------------------------------------
# hf:PATH (tiny models built here; no download)


@pytest.mark.parametrize(
    ("archs", "task", "auto"),
    [
        (["LlamaForCausalLM"], "text-generation", "AutoModelForCausalLM"),
        (["BertForSequenceClassification"], "text-classification", "AutoModelForSequenceClassification"),
        (["ViTForImageClassification"], "image-classification", "AutoModelForImageClassification"),
        (["BertModel"], "feature-extraction", "AutoModel"),
        (None, "feature-extraction", "AutoModel"),
    ],
)
def test_hf_task(archs: list[str] | None, task: str, auto: str) -> None:
    assert hf_task(archs) == (task, auto)


def _bert_dir(tmp_path: Path, with_tokenizer: bool) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    path = tmp_path / "tiny-bert"
    model.save_pretrained(path)
    if with_tokenizer:
        words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "small", "model", "that", "runs", "fast", "on", "device", "is"]
        vocab = tmp_path / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
        transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    return path


def test_hf_text_classifier_with_tokenizer(tmp_path: Path) -> None:
    path = _bert_dir(tmp_path, with_tokenizer=True)
    t = load_teacher(f"hf:{path}")
    assert t.hf == {"path": str(path.resolve()), "task": "text-classification",
                    "auto_class": "AutoModelForSequenceClassification"}  # fmt: skip
    assert type(t.module).__name__ == "BertForSequenceClassification"
    assert not t.module.training
    assert t.module.config._attn_implementation in ("sdpa", "eager")
    assert set(t.example_kwargs) == {"input_ids", "attention_mask", "token_type_ids"}
    ids = t.example_kwargs["input_ids"]
    assert ids.shape == (1, 32)
    assert int(ids[0, 0]) == 2  # [CLS]: a real tokenized sentence, padded
    assert int(t.example_kwargs["attention_mask"].sum()) < 32
    assert t.label == "hf:tiny-bert"
    assert {p.name for p in t.sources} >= {"config.json", "vocab.txt"}
    out = t.module(**t.example_kwargs)
    assert out.logits.shape == (1, 3)


def test_hf_without_tokenizer_uses_token_ids_of_the_vocab(tmp_path: Path) -> None:
    path = _bert_dir(tmp_path, with_tokenizer=False)
    t = load_teacher(f"hf:{path}")
    ids = t.example_kwargs["input_ids"]
    assert ids.shape == (1, 32) and int(ids.max()) < 64
    assert int(t.example_kwargs["attention_mask"].sum()) == 32


def test_hf_causal_lm_has_no_cache(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    t = load_teacher(f"hf:{tmp_path / 'llama'}")
    assert t.hf is not None and t.hf["task"] == "text-generation"
    assert t.module.config.use_cache is False
    assert "token_type_ids" not in t.example_kwargs
    out = t.module(**t.example_kwargs)
    assert out.logits.shape[-1] == 50 and getattr(out, "past_key_values", None) is None


def test_hf_vision_uses_pixel_values(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=5)  # fmt: skip
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    t = load_teacher(f"hf:{tmp_path / 'vit'}")
    assert t.hf is not None and t.hf["auto_class"] == "AutoModelForImageClassification"
    assert list(t.example_kwargs) == ["pixel_values"]
    assert t.example_kwargs["pixel_values"].shape == (1, 3, 32, 32)
    assert t.module(**t.example_kwargs).logits.shape == (1, 5)


def test_hf_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_teacher(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(InputError, match=r"has no config\.json"):
        load_teacher(f"hf:{tmp_path}")
    with pytest.raises(InputError, match="--input-shape does not apply"):
        load_teacher(f"hf:{tmp_path}", ["1x3"])


# ---------------------------------------------------------------------------------------------
# Calibration


def test_calibration_from_a_file_function(tmp_path: Path) -> None:
    path = write(tmp_path, "teach.py", TINY_CNN + """
def example_inputs():
    return (torch.ones(1, 3, 8, 8),)

def my_calib():
    for i in range(3):
        yield torch.full((2, 3, 8, 8), float(i))
""")
    t = load_teacher(f"{path}:factory")
    calib = load_calibration(f"{path}:my_calib", t)
    assert calib is not None
    batches = list(iter_batches(calib))
    assert len(batches) == 3 and batches[2].args[0].mean().item() == 2.0


def test_calibration_defaults_to_the_teacher_files_hook(tmp_path: Path) -> None:
    path = write(tmp_path, "hooked.py", TINY_CNN + """
def example_inputs():
    return (torch.ones(1, 3, 8, 8),)

def calib_data():
    yield torch.zeros(1, 3, 8, 8)
""")
    t = load_teacher(f"{path}:factory")
    assert load_calibration(None, t) is t.hooks["calib_data"]
    bare = write(tmp_path, "bare2.py", TINY_CNN)
    assert load_calibration(None, load_teacher(f"{bare}:factory", ["1x3x8x8"])) is None


def test_hf_text_calibration_default_corpus_and_text_file(tmp_path: Path) -> None:
    path = _bert_dir(tmp_path, with_tokenizer=True)
    t = load_teacher(f"hf:{path}")
    notes: list[str] = []
    calib = load_calibration(None, t, batch_size=4, num_batches=2, seq_len=16, note=notes.append)
    assert calib is not None
    batches = list(calib())  # num_batches=2 is raised to 512 sentences after the held-out quarter
    assert len(batches) == text_calib_batches(4) and batches[0]["input_ids"].shape == (4, 16)
    assert len(batches) - round(0.25 * len(batches)) >= 512 // 4
    assert notes and "docstrings" in notes[0] and f"{4 * len(batches)} sentences" in notes[0]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox\n\nthe lazy dog\na small model\n")
    calib = load_calibration(str(corpus), t, batch_size=2, num_batches=5, seq_len=8)
    assert calib is not None
    sizes = [b["input_ids"].shape[0] for b in calib()]
    assert sizes == [2, 1]  # three non-empty lines
    with pytest.raises(InputError, match="no such file"):
        load_calibration(str(tmp_path / "missing.txt"), t)


def test_a_causal_lm_calibrates_on_windows_of_running_text(tmp_path: Path) -> None:
    """Lines are read as one stream and cut into full windows (no padding, windows start mid-text),
    as a causal LM reads prose; an encoder keeps one padded sentence a row (above)."""
    transformers = pytest.importorskip("transformers")
    bert = _bert_dir(tmp_path, with_tokenizer=True)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    path = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert)
    tokenizer.save_pretrained(path)
    t = load_teacher(f"hf:{path}")
    lines = ["the quick brown fox jumps", "over the lazy dog", "a small model that runs fast on device",
             "the fox is small", "the dog runs"] * 3
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    calib = load_calibration(str(corpus), t, batch_size=2, num_batches=50, seq_len=8)
    assert calib is not None
    batches = list(calib())
    ids = torch.cat([b["input_ids"] for b in batches])
    assert all(b["input_ids"].shape[1] == 8 and bool(b["attention_mask"].all()) for b in batches)
    stream = tokenizer("\n".join(lines) + "\n", add_special_tokens=False)["input_ids"]
    assert ids.flatten().tolist() == stream[: ids.numel()] and len(stream) - ids.numel() < 8  # no token lost
    assert len(batches) == -(-(len(stream) // 8) // 2) and len(batches) < len(lines)  # fewer rows than lines


def test_text_calibration_needs_a_text_model(tmp_path: Path) -> None:
    path = write(tmp_path, "cnn.py", TINY_CNN)
    t = load_teacher(f"{path}:factory", ["1x3x8x8"])
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello\n")
    with pytest.raises(InputError, match="text models only"):
        load_calibration(str(corpus), t)


def test_docstring_corpus_is_deterministic_english() -> None:
    a, b = docstring_corpus(20), docstring_corpus(20)
    assert a == b and len(a) == 20
    assert all(s[0].isupper() and s.endswith(".") and len(s) >= 40 for s in a)
    assert len(set(a)) == len(a)
